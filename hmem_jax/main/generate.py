"""Generate from a trained run: `python -m hmem_jax.main.generate --workdir=DIR --prompt=...`.

Each prompt is routed with the run's ClusterTree, its path's memory blocks are
fetched from the checkpointed bank, and the continuation is decoded with a KV
cache. `--memory=none` uses the anchor alone, `generic` the generic memory.
Prompts come from repeated `--prompt` flags and/or `--prompts_file` (one
prompt per line, or jsonl objects with a "prompt" field).
"""

from __future__ import annotations

import time

from absl import flags

from hmem_jax.main import common

WORKDIR = common.workdir_flag()
PROMPTS = flags.DEFINE_multi_string("prompt", [], "A prompt; repeatable.")
PROMPTS_FILE = flags.DEFINE_string("prompts_file", "", "Text (one prompt a line) or jsonl file.")
MEMORY = flags.DEFINE_enum(
    "memory", "fetched", ["none", "generic", "fetched"], "Which memory the anchor uses."
)
MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "Tokens to generate per prompt.")
TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = all).")
TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
STEP = common.step_flag()
BATCH = flags.DEFINE_integer("batch_size", 16, "Prompts decoded together.")


def main(argv: list[str]) -> None:
    from hmem_jax.infer.decode import Sampling
    from hmem_jax.infer.engine import Engine
    from hmem_jax.infer.inputs import read_prompts
    from hmem_jax.infer.run import load_run

    if BATCH.value < 1:
        common.fail(f"--batch_size = {BATCH.value} must be >= 1.")
    prompts = list(PROMPTS.value) + (read_prompts(PROMPTS_FILE.value) if PROMPTS_FILE.value else [])
    if not prompts:
        common.fail("No prompts: give --prompt=TEXT (repeatable) or --prompts_file=PATH.")
    sampling = Sampling(
        max_new_tokens=MAX_NEW.value,
        temperature=TEMPERATURE.value,
        top_k=TOP_K.value,
        top_p=TOP_P.value,
        seed=SEED.value,
    )
    engine = Engine(load_run(WORKDIR.value, STEP.value))
    mode = MEMORY.value
    common.check_memory_mode(engine, mode, WORKDIR.value)
    for start in range(0, len(prompts), BATCH.value):
        chunk = prompts[start : start + BATCH.value]
        ids = engine.block_ids(chunk) if mode == "fetched" else None
        began = time.perf_counter()
        outputs = engine.generate(chunk, mode, sampling)
        seconds = time.perf_counter() - began
        for row, (prompt, output) in enumerate(zip(chunk, outputs)):
            route = f" [blocks {ids[row].tolist()}]" if ids is not None else ""
            print(f"{prompt}{route}\n  -> {output}", flush=True)
        print(f"({len(chunk)} prompts, {seconds:.2f} s incl. compilation)", flush=True)


def run() -> None:
    """The command line entry point."""
    common.run(main, hint="pass prompts with --prompt")


if __name__ == "__main__":
    run()
