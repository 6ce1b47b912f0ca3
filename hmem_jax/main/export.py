"""Export a run for `transformers`: `python -m hmem_jax.main.export --workdir=DIR --out=OUT`.

`--memory=none` (default) exports the anchor alone; `--memory=fetched` with
`--route_text=TEXT` (routed with the run's tree) or `--path=i1,i2,...` (child
index per level) merges that path's FFN memory into a wider FFN;
`--memory=generic` merges the generic memory. `--bank=BANK_DIR` also writes
the whole bank (one safetensors file per level) with a manifest and the tree.
"""

from __future__ import annotations

from typing import Any

from absl import flags

from hmem_jax import paths
from hmem_jax.main import common

WORKDIR = common.workdir_flag()
OUT = common.out_flag("Folder for the transformers checkpoint.", required=True)
MEMORY = flags.DEFINE_enum(
    "memory", "none", ["none", "generic", "fetched"], "Memory merged into the exported model."
)
ROUTE_TEXT = flags.DEFINE_string("route_text", "", "Text whose route picks the path (fetched).")
PATH = flags.DEFINE_string("path", "", "Comma-separated child index per level (fetched).")
BANK = flags.DEFINE_string("bank", "", "Also export the bank into this folder.")
STEP = common.step_flag()
OVERWRITE = common.overwrite_flag()


def main(argv: list[str]) -> None:
    import numpy as np

    from hmem_jax.infer.engine import Engine
    from hmem_jax.infer.run import load_run
    from hmem_jax.interop.hf_export import export_bank, export_hf

    common.refuse_to_overwrite(OUT.value, "--out", OVERWRITE.value)
    if BANK.value:
        common.refuse_to_overwrite(BANK.value, "--bank", OVERWRITE.value)
    mode, memory, path_ids = MEMORY.value, None, None
    if mode == "fetched" and bool(ROUTE_TEXT.value) == bool(PATH.value):
        common.fail("--memory=fetched needs exactly one of --route_text or --path.")
    run = load_run(WORKDIR.value, STEP.value)
    if BANK.value and run.streamed is not None:
        common.fail(
            "--bank: this run's bank is streamed (MemoryConfig.bank_tier = 'streaming'); it "
            f"already is a tensorstore bank ({run.cfg.memory.bank_store or 'WORKDIR/bank'}, "
            f"version {run.step}). Export single blocks with --memory=fetched, or copy the store."
        )
    if BANK.value and (run.bank is None or run.plan is None):
        common.fail("--bank: this run has no memory bank.")
    engine = Engine(run)
    common.check_memory_mode(engine, mode, run.workdir)
    if mode == "fetched":
        if PATH.value:
            path_ids = run.tree.block_ids(parse_path(PATH.value, run.tree))
        else:
            path_ids = engine.block_ids([ROUTE_TEXT.value])
    if mode != "none":
        memory = engine.memory(
            path_ids if path_ids is not None else np.zeros((1, run.tree.depth), np.int32), mode
        )
    metadata = {
        "run": run.workdir,
        "step": run.step,
        "memory": mode,
        "block_ids": path_ids[0].tolist() if path_ids is not None else None,
        "route_text": ROUTE_TEXT.value or None,
    }
    with paths.staged(OUT.value) as local:  # gs:// or s3:// --out: written here, uploaded
        out = export_hf(
            local,
            run.cfg.model,
            run.params,
            memory,
            run.plan.lora_scale if run.plan else 1.0,
            run.prepared_dir,
            metadata,
        )
    out = OUT.value if paths.is_remote(OUT.value) else out
    print(f"exported {mode} model to {paths.absolute(out)}", flush=True)
    if BANK.value:
        assert run.bank is not None and run.plan is not None  # checked above
        with paths.staged(BANK.value) as local:
            export_bank(
                local,
                run.bank,
                run.plan.geometry.describe(),
                run.tree_dir,
                {"run": run.workdir, "step": run.step},
            )
        print(f"exported bank to {paths.absolute(BANK.value)}", flush=True)


def parse_path(text: str, tree: Any) -> Any:
    """int32[1, depth] from --path=i1,i2,... (one child index per level of the run's tree)."""
    import numpy as np

    try:
        path = [int(i) for i in text.split(",")]
    except ValueError:
        common.fail(f"--path={text}: give comma-separated integers, one child index per level.")
    if len(path) != tree.depth or not all(0 <= i < tree.branching for i in path):
        common.fail(
            f"--path={text}: the run's tree needs {tree.depth} child indices (one per level), "
            f"each in 0 .. {tree.branching - 1}."
        )
    return np.array([path], np.int32)


def run() -> None:
    """The command line entry point."""
    common.run(main)


if __name__ == "__main__":
    run()
