"""The paper's recipe against its equal-budget baseline, then the long-tail probe of both:
`python -m hmem_jax.main.recipe --workdir=DIR --gin_file=experiments/default.gin`.

Trains WORKDIR/baseline (anchor only) and WORKDIR/memory (the pretrained
anchor co-trained with the memory the gin file configures), sharing one tree
and one prepared corpus (see hmem_jax/train/recipe.py), then prints one table:
the baseline, and the memory run with fetched memory, with memory removed
(the anchor alone), with the generic memory, with the prompt's level-1 subtree
blocked, and with the oracle route (memory fetched by the path of the
documents that state the fact). Re-running the command resumes; results go
to WORKDIR/probe.json.
"""

from __future__ import annotations

import json

from hmem_jax import paths
from hmem_jax.main import common

WORKDIR = common.workdir_flag("Folder of the recipe's runs.")


def _probe(recipe, limit: int) -> None:
    from hmem_jax.infer.engine import Engine
    from hmem_jax.infer.probe import (
        compare_runs,
        documents_by_id,
        format_probe_table,
        read_probe_file,
        sample_probes,
    )
    from hmem_jax.infer.run import load_run
    from hmem_jax.train.recipe import BASELINE, MEMORY

    engines = {name: Engine(load_run(recipe.stage_dir(name))) for name in (BASELINE, MEMORY)}
    memory_run, baseline_run = engines[MEMORY].run, engines[BASELINE].run
    path = paths.join(memory_run.prepared_dir, "probes.jsonl")
    if not paths.isfile(path):
        print(
            f"hmem_jax recipe: no probes ({path} does not exist; the embedded corpus has "
            "them, or run `hmem evaluate --probe_file=...` on both runs)",
            flush=True,
        )
        return
    items = sample_probes(read_probe_file(path), limit)
    documents = documents_by_id(memory_run.cfg.data)
    table = compare_runs(
        engines, items, ("fetched", "oracle", "blocked", "generic", "anchor"), documents
    )
    names = {
        f"{BASELINE}: anchor": f"baseline, anchor only ({baseline_run.cfg.steps} steps)",
        f"{MEMORY}: anchor": "memory run, memory removed",
    }
    table = {
        names.get(name, name.replace(f"{MEMORY}: ", "memory run, ")): row
        for name, row in table.items()
    }
    with paths.open_file(paths.join(recipe.workdir, "probe.json"), "w") as handle:
        json.dump(table, handle, indent=1)
    cfg = memory_run.cfg
    print(
        f"long-tail probe ({len(items)} probes; accuracy % by frequency bucket, 0 = rarest; "
        f"both runs trained {baseline_run.cfg.steps} steps of {cfg.batch_size} x "
        f"{cfg.seq_len} tokens):\n" + format_probe_table(table, label="run"),
        flush=True,
    )


def main(argv: list[str]) -> None:
    import jax

    from hmem_jax.train.recipe import Recipe, run_recipe

    recipe = Recipe(
        paths.absolute(WORKDIR.value),
        tuple(common.GIN_FILES.value),
        tuple(common.GIN_PARAMS.value),
    )
    recipe.check()
    finished = run_recipe(recipe)
    if finished and jax.process_index() == 0:
        _probe(recipe, recipe.settings().probe_limit)


def run() -> None:
    """The command line entry point."""
    common.run(main, hint="configure the recipe with --gin_file and --gin_param", distributed=True)


if __name__ == "__main__":
    run()
