"""Where a run keeps its tree, data and configuration, and how they are made on first use.

A memory run routes with `TrainConfig.tree_dir`, or with WORKDIR/tree fitted
on the corpus the first time; its data is `DataConfig.prepared_dir`, or
WORKDIR/data prepared the first time. Process 0 fits and prepares, every
process then opens its own slice of each batch. An anchor-only run with a
`tree_dir` reads data packed by that tree (so it can share a memory run's
prepared data).
"""

from __future__ import annotations

import dataclasses
import json

from hmem_jax import paths
from hmem_jax.config import ConfigError, TrainConfig
from hmem_jax.data.loader import Loader
from hmem_jax.errors import MissingPathError


def write_run_config(cfg: TrainConfig, workdir: str) -> None:
    """The operative gin config and the resolved dataclasses, next to the checkpoints."""
    import gin

    paths.makedirs(workdir)
    with paths.open_file(paths.join(workdir, "config.gin"), "w") as f:
        f.write(gin.operative_config_str())
    with paths.open_file(paths.join(workdir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1, default=str)


def check_resume(cfg: TrainConfig, workdir: str, data_fingerprint: str) -> None:
    """If the workdir holds checkpoints, the configuration must be able to resume the latest
    (checked before anything of the run is written, so a refused resume changes nothing)."""
    from hmem_jax.train.checkpoint import Checkpointer
    from hmem_jax.train.resume import check_resumable

    directory = paths.join(workdir, "checkpoints")
    if not paths.isdir(directory):
        return
    checkpointer = Checkpointer(directory, every=1, keep=1 << 30, async_save=False)
    try:
        newest = checkpointer.newest_record()
        if newest is not None:
            step, record = newest
            check_resumable(record, cfg, data_fingerprint, f"{directory}/{step}")
    finally:
        checkpointer.close()


def tree_dir_of(cfg: TrainConfig, workdir: str) -> str | None:
    """Where the run's ClusterTree lives (None: an anchor-only run without one)."""
    if cfg.tree_dir:
        return cfg.tree_dir
    return paths.join(workdir, "tree") if cfg.memory.enabled else None


def prepared_dir_of(cfg: TrainConfig, workdir: str) -> str:
    return cfg.data.prepared_dir or paths.join(workdir, "data")


def ensure_tree(cfg: TrainConfig, workdir: str) -> str | None:
    """The ClusterTree a memory run routes with: `TrainConfig.tree_dir`, or WORKDIR/tree fitted
    on the corpus (HierarchyConfig.embedder: hashed_idf, hashed or MiniLM) the first time."""
    tree_dir = tree_dir_of(cfg, workdir)
    if tree_dir is None:
        return None
    from hmem_jax.hierarchy.corpus import cluster_corpus
    from hmem_jax.hierarchy.tree import MANIFEST_NAME

    if not paths.isfile(paths.join(tree_dir, MANIFEST_NAME)):
        if cfg.tree_dir:
            raise MissingPathError(
                f"TrainConfig.tree_dir = {cfg.tree_dir!r} holds no ClusterTree "
                f"({MANIFEST_NAME}); fit one with `python -m "
                "hmem_jax.main.cluster`, or leave tree_dir empty."
            )
        print(
            f"hmem_jax: fitting a {cfg.hierarchy.branching}x{cfg.hierarchy.depth} cluster tree "
            f"on the corpus into {tree_dir}",
            flush=True,
        )
        cluster_corpus(cfg.data, cfg.hierarchy, tree_dir, verbose=False)
    elif not cfg.tree_dir:
        _check_own_tree_embedder(cfg, tree_dir)
    return tree_dir


def _check_own_tree_embedder(cfg: TrainConfig, tree_dir: str) -> None:
    """A tree this run fitted earlier must be in the space the configuration now names; reusing a
    tree of another embedder would silently train on routes the configuration does not describe."""
    from hmem_jax.hierarchy.tree import read_manifest

    fitted_with = read_manifest(tree_dir)["embedder"]
    if fitted_with != cfg.hierarchy.embedder:
        raise ConfigError(
            f"{tree_dir} was fitted with the '{fitted_with}' embedder, but the configuration names "
            f"HierarchyConfig.embedder = '{cfg.hierarchy.embedder}'. Use a new --workdir for the "
            f"new embedder, or add --gin_param=\"HierarchyConfig.embedder = '{fitted_with}'\" "
            "to continue this run as it was."
        )


def check_before_start(cfg: TrainConfig, devices: int) -> None:
    """What can be refused before any slow step (tree fit, data preparation): memory that does
    not fit the tree, a run that needs an anchor it was not given (or one that is not there),
    a mesh that does not fit the devices or the batch."""
    from hmem_jax import sharding

    if cfg.memory.enabled:
        from hmem_jax.bank.geometry import BankGeometry

        BankGeometry.from_configs(cfg.model, cfg.memory, cfg.hierarchy)
    cfg.check_startable()
    if cfg.init_from and not paths.exists(cfg.init_from):
        raise ConfigError(
            f"TrainConfig.init_from = {cfg.init_from!r} does not exist; point it at an anchor "
            "run's workdir or one of its checkpoints/<step> folders."
        )
    shards = sharding.batch_shards_for(cfg.mesh, devices)
    mesh = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(cfg.mesh, devices)))
    cfg.check_batch_shards(shards, str(mesh))


def check_paths(cfg: TrainConfig, workdir: str) -> None:
    """Check, before anything is written, that every object store the run names answers
    (endpoint, bucket, credentials): the workdir, the prepared data, the tree, the anchor
    (`init_from`) and a streamed bank. A local path is not checked here."""
    named = [
        ("--workdir", workdir),
        ("DataConfig.prepared_dir", cfg.data.prepared_dir),
        ("TrainConfig.tree_dir", cfg.tree_dir),
        ("TrainConfig.init_from", cfg.init_from),
    ]
    for what, location in named:
        if paths.is_remote(location):
            spec = paths.kvstore_spec(location)
            paths.check_kvstore(spec, f"{what}={location}")
    if cfg.memory.enabled and cfg.memory.bank_tier == "streaming":
        from hmem_jax.bank.layout import describe_location, kvstore_spec

        spec = kvstore_spec(cfg.memory.bank_store, workdir)
        paths.check_kvstore(spec, f"MemoryConfig.bank_store ({describe_location(spec)})")


def make_loader(cfg: TrainConfig, workdir: str, devices: int | None = None) -> Loader:
    """Fit the tree and prepare the data if needed (process 0), then open this process's loader
    for a mesh over `devices` devices (default: all of them; `train(devices=...)` may use fewer)."""
    import jax
    from jax.experimental import multihost_utils

    from hmem_jax import sharding
    from hmem_jax.data.prepare import ensure_prepared
    from hmem_jax.data.prepared import local_copy
    from hmem_jax.data.routing import TreeRouter

    count = devices or jax.device_count()
    check_paths(cfg, workdir)
    check_before_start(cfg, count)
    batch_shards = sharding.batch_shards_for(cfg.mesh, count)
    prepared = prepared_dir_of(cfg, workdir)
    tree_dir = tree_dir_of(cfg, workdir)
    if jax.process_index() == 0:
        ensure_tree(cfg, workdir)
        ensure_prepared(cfg, prepared, tree_dir)
    multihost_utils.sync_global_devices("hmem_jax.data.prepared")
    tree_hash = TreeRouter.load(tree_dir).content_hash if tree_dir else None
    return Loader(
        local_copy(prepared),  # grain reads local files: a URL is copied to this host once
        cfg.batch_size,
        cfg.seq_len,
        cfg.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        batch_shards=batch_shards,
        tree_hash=tree_hash,
        worker_count=cfg.data.worker_count,
        prefetch=cfg.data.prefetch,
        subtree=cfg.subtree if cfg.subtree >= 0 else None,
    )
