"""Merging the banks of subtree-parallel frozen-anchor jobs into one run (docs/method.md).

The paper trains the memory beside a frozen anchor as 16 independent jobs,
one per level-1 subtree, and merges them. Every block at every level has
exactly one level-1 ancestor (block id_l // branching^(l-1)), so a job that
reads only its subtree's records fetches, updates and owns only that
subtree's blocks: the merge takes each block, with its moments and update
count, from the job that owns it, and no level needs averaging. The one
shared piece is the generic memory (context-independent, trained by every
job on its own subtree's share of sequences): the merged generic block is
the mean of the jobs' blocks, weighted by their update counts. Subtrees no
job trained keep their initial blocks.

The merged folder is a run like any other (config.gin with
`TrainConfig.subtree = -1`, one checkpoint holding the shared anchor, its
optimizer state and the merged bank): evaluate, generate, export and
`init_from` read it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hmem_jax.bank.device import GENERIC, LevelBank
from hmem_jax.config import ConfigError


def owning_subtree(level: int, ids: np.ndarray, branching: int) -> np.ndarray:
    """The level-1 cluster each level-`level` block id descends from."""
    return np.asarray(ids) // branching ** (level - 1)


def merge_banks(
    banks: Sequence[Mapping[str, LevelBank]], subtrees: Sequence[int], branching: int
) -> dict[str, LevelBank]:
    """One bank: every level's blocks from the job of their level-1 subtree (see above)."""
    banks = [jax.tree.map(np.asarray, bank) for bank in banks]
    merged: dict[str, LevelBank] = {}
    for key, first in banks[0].items():
        if key == GENERIC:
            merged[key] = _mean_generic([bank[key] for bank in banks])
            continue
        level = int(key[1:])
        owner = owning_subtree(level, np.arange(len(first.count)), branching)
        out = jax.tree.map(np.array, first)  # copies: unowned subtrees keep job 0's (initial)
        for bank, subtree in zip(banks, subtrees):
            rows = owner == subtree
            out = jax.tree.map(lambda mine, theirs: _set_rows(mine, theirs, rows), out, bank[key])
        merged[key] = out
    return merged


def _set_rows(mine: np.ndarray, theirs: np.ndarray, rows: np.ndarray) -> np.ndarray:
    mine[rows] = theirs[rows]
    return mine


def _mean_generic(generic: Sequence[LevelBank]) -> LevelBank:
    counts = np.array([float(g.count[0]) for g in generic])
    weights = counts / counts.sum() if counts.sum() > 0 else np.full(len(generic), 1 / len(generic))

    def mean(*arrays: np.ndarray) -> np.ndarray:
        total = sum(w * a.astype(np.float32) for w, a in zip(weights, arrays))
        return total.astype(arrays[0].dtype)

    count = np.array([int(counts.sum())], generic[0].count.dtype)
    return jax.tree.map(mean, *generic).replace(count=count)


def merge_subtree_runs(run_dirs: Sequence[str], out_dir: str) -> str:
    """Merge subtree jobs (run folders) into the run folder `out_dir`; returns it."""
    from hmem_jax.infer.run import load_run
    from hmem_jax.train.checkpoint import Checkpointer
    from hmem_jax.train.state import TrainState

    if len(run_dirs) < 1:
        raise ConfigError("Give the subtree jobs' run folders to merge (at least one).")
    if os.path.exists(os.path.join(out_dir, "checkpoints")):
        raise ConfigError(f"{out_dir!r} already holds checkpoints; merge into a new folder.")
    runs = [load_run(d) for d in run_dirs]
    first = runs[0].cfg
    subtrees = []
    for run in runs:
        cfg = run.cfg
        where = run.workdir
        if cfg.subtree < 0 or cfg.memory.mode != "frozen_anchor":
            raise ConfigError(
                f"{where} is not a subtree job (TrainConfig.subtree >= 0 with "
                "MemoryConfig.mode = 'frozen_anchor')."
            )
        if run.bank is None:
            raise ConfigError(
                f"{where} keeps its bank in a store (bank_tier 'streaming'); "
                "merging covers device-tier jobs."
            )
        same = (cfg.model, cfg.memory, cfg.hierarchy, cfg.init_from)
        if (
            same != (first.model, first.memory, first.hierarchy, first.init_from)
            or run.tree.content_hash != runs[0].tree.content_hash
        ):
            raise ConfigError(
                f"{where} differs from {runs[0].workdir} in model, memory, "
                "hierarchy, tree or init_from; subtree jobs must share all five."
            )
        if cfg.subtree in subtrees:
            raise ConfigError(f"Two jobs trained subtree {cfg.subtree}; merge one of them.")
        subtrees.append(cfg.subtree)
        for a, b in zip(jax.tree.leaves(run.params), jax.tree.leaves(runs[0].params)):
            if not np.array_equal(np.asarray(a), np.asarray(b)):
                raise ConfigError(
                    f"The anchor of {where} differs from {runs[0].workdir}'s: "
                    "subtree jobs must freeze the same anchor."
                )
    bank = merge_banks([run.bank for run in runs], subtrees, first.hierarchy.branching)
    step = max(run.step for run in runs)
    state = TrainState(
        step=jnp.asarray(step, jnp.int32),
        params=runs[0].params,
        opt_state=runs[0].opt_state,
        bank=bank,
    )
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(runs[0].workdir, "config.gin")) as handle:
        gin_text = handle.read()
    with open(os.path.join(out_dir, "config.gin"), "w") as handle:
        handle.write(gin_text + "\n# merged subtree jobs\nTrainConfig.subtree = -1\n")
    merged_cfg = dataclasses.replace(first, subtree=-1)
    with open(os.path.join(out_dir, "config.json"), "w") as handle:
        json.dump(dataclasses.asdict(merged_cfg), handle, indent=1, default=str)
    checkpointer = Checkpointer(
        os.path.join(out_dir, "checkpoints"), every=1, keep=1, async_save=False
    )
    try:
        record = {"merged_from": [run.workdir for run in runs], "subtrees": subtrees}
        checkpointer.save(step, state, record, force=True)
        checkpointer.wait()
    finally:
        checkpointer.close()
    return out_dir
