"""Train a model: `python -m hmem_jax.main.train --workdir=DIR --gin_file=experiments/X.gin`.

The workdir holds everything a run writes: `config.gin` (the operative gin
config), `config.json`, `checkpoints/`, `metrics.jsonl`, `tensorboard/`, and
`data/` (the prepared corpus, unless `DataConfig.prepared_dir` points
elsewhere). Re-running the same command resumes from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os

from absl import app, flags

from hmem_jax.config import ConfigError, TrainConfig
from hmem_jax.main import common

WORKDIR = flags.DEFINE_string("workdir", None, "Run folder (checkpoints, metrics, config).",
                              required=True)
UNTIL_STEP = flags.DEFINE_integer(
    "until_step", None, "Stop after this step (checkpointing it), as a preempted job would; "
    "the schedule still spans TrainConfig.steps.")
PROBE_LIMIT = flags.DEFINE_integer(
    "probe_limit", 500, "After training, run the long-tail probe on this many probe prompts of the "
    "prepared data (embedded corpus) and print the per-bucket table; 0 = skip.")
PEAK_TFLOPS = flags.DEFINE_float(
    "peak_tflops", 0.0, "Peak TFLOP/s per device for MFU; 0 = data sheet by device kind, or a "
    "measured matmul peak on CPU.")


def write_run_config(cfg: TrainConfig, workdir: str) -> None:
    """The operative gin config and the resolved dataclasses, next to the checkpoints."""
    import gin
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.gin"), "w") as f:
        f.write(gin.operative_config_str())
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1, default=str)


def ensure_tree(cfg: TrainConfig, workdir: str) -> str | None:
    """The ClusterTree a memory run routes with: `TrainConfig.tree_dir`, or WORKDIR/tree fitted
    on the corpus (hashed or MiniLM embeddings, HierarchyConfig) the first time."""
    if not cfg.memory.enabled:
        return None
    from hmem_jax.hierarchy.tree import MANIFEST_NAME
    from hmem_jax.main.cluster import cluster_corpus

    tree_dir = cfg.tree_dir or os.path.join(workdir, "tree")
    if not os.path.isfile(os.path.join(tree_dir, MANIFEST_NAME)):
        if cfg.tree_dir:
            raise FileNotFoundError(f"TrainConfig.tree_dir = {cfg.tree_dir!r} holds no ClusterTree "
                                    f"({MANIFEST_NAME}); fit one with `python -m "
                                    "hmem_jax.main.cluster`, or leave tree_dir empty.")
        print(f"hmem_jax: fitting a {cfg.hierarchy.branching}x{cfg.hierarchy.depth} cluster tree "
              f"on the corpus into {tree_dir}", flush=True)
        cluster_corpus(cfg.data, cfg.hierarchy, tree_dir, verbose=False)
    return tree_dir


def make_loader(cfg: TrainConfig, workdir: str):
    """Fit the tree and prepare the data if needed (process 0), then open this process's loader."""
    import jax
    from jax.experimental import multihost_utils

    from hmem_jax.data.loader import Loader
    from hmem_jax.data.prepare import TreeRouter, ensure_prepared

    prepared = cfg.data.prepared_dir or os.path.join(workdir, "data")
    tree_dir = cfg.tree_dir or (os.path.join(workdir, "tree") if cfg.memory.enabled else None)
    if jax.process_index() == 0:
        ensure_tree(cfg, workdir)
        ensure_prepared(cfg, prepared, tree_dir)
    multihost_utils.sync_global_devices("hmem_jax.data.prepared")
    tree_hash = TreeRouter.load(tree_dir).content_hash if tree_dir else None
    return Loader(prepared, cfg.batch_size, cfg.seq_len, cfg.seed,
                  process_index=jax.process_index(), process_count=jax.process_count(),
                  tree_hash=tree_hash, worker_count=cfg.data.worker_count,
                  prefetch=cfg.data.prefetch)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        common.fail(f"Unexpected arguments {argv[1:]}; configure the run with --gin_file and "
                    "--gin_param.")
    common.initialize_distributed()
    import jax

    from hmem_jax.data.prepare import PreparedDataError
    from hmem_jax.train.checkpoint import CheckpointMismatchError
    from hmem_jax.train.loop import fingerprint, train

    try:
        cfg = common.config_from_flags()
    except ConfigError as error:
        common.fail(str(error))
    workdir = os.path.abspath(WORKDIR.value)
    if jax.process_index() == 0:
        write_run_config(cfg, workdir)
    try:
        loader = make_loader(cfg, workdir)
        train(cfg, workdir, loader, fingerprint(loader.fingerprint), until_step=UNTIL_STEP.value,
              peak_tflops=PEAK_TFLOPS.value)
    except (ConfigError, PreparedDataError, CheckpointMismatchError, FileNotFoundError) as error:
        common.fail(str(error))
    if jax.process_index() == 0 and UNTIL_STEP.value is None and PROBE_LIMIT.value > 0:
        print_probe_table(workdir, PROBE_LIMIT.value)


def print_probe_table(workdir: str, limit: int) -> None:
    """The long-tail probe (PAPER.md §5) per frequency bucket, for runs on the embedded corpus."""
    from hmem_jax.infer.probe import format_probe_table, probe_workdir

    table = probe_workdir(workdir, limit=limit)
    if table:
        print("long-tail probe (accuracy % by frequency bucket, 0 = rarest):\n"
              + format_probe_table(table), flush=True)


if __name__ == "__main__":
    app.run(main)
