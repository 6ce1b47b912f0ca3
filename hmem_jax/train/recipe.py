"""The paper's two-phase recipe and its equal-budget baseline, trained as one resumable job.

    WORKDIR/tree, WORKDIR/data   one ClusterTree and one prepared corpus for both runs
    WORKDIR/baseline             anchor only, anchor_steps + steps steps, one schedule
    WORKDIR/memory               anchor from baseline/checkpoints/<anchor_steps>, then
                                 anchor + memory for `steps` steps (mode 'cotrain', or
                                 'frozen_anchor' when the gin files say so)

The paper pretrains the anchor, then co-trains anchor and memory on as many
tokens again, and compares with an anchor-only model given the same total
budget. Here the baseline *is* the anchor's pretraining continued without
memory: both runs share their first `anchor_steps` steps bit for bit, see the
same number of tokens, and differ only in what the second phase trains.

Each run is configured by the recipe's gin files plus a few bindings of its
own (`Recipe.bindings`), so its `config.gin` reproduces it exactly and every
tool that loads a run (evaluate, generate, export) works on either. Stages
run in the order baseline (to anchor_steps), memory, baseline (to the end);
each resumes from its own checkpoints, so re-running the job after an
interruption continues where it stopped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import gin

from hmem_jax import paths
from hmem_jax.config import ConfigError, RecipeConfig, TrainConfig
from hmem_jax.gin_parsing import build_train_config, parse_gin

BASELINE, MEMORY = "baseline", "memory"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A recipe folder and the gin configuration of its memory run."""

    workdir: str
    gin_files: tuple[str, ...] = ()
    gin_params: tuple[str, ...] = ()

    def stage_dir(self, stage: str) -> str:
        return paths.join(self.workdir, stage)

    def settings(self) -> RecipeConfig:
        parse_gin(self.gin_files, self.gin_params)
        return RecipeConfig()

    def bindings(self, stage: str) -> dict[str, Any]:
        """What `stage` binds on top of the recipe's gin files (parses gin: global state)."""
        recipe = self.settings()
        given = build_train_config()
        shared = {
            "TrainConfig.tree_dir": given.tree_dir or paths.join(self.workdir, "tree"),
            "DataConfig.prepared_dir": (
                given.data.prepared_dir or paths.join(self.workdir, "data")
            ),
        }
        if stage == MEMORY:
            # The baseline checkpoint the memory run starts from.
            anchor = paths.join(self.stage_dir(BASELINE), "checkpoints", str(recipe.anchor_steps))
            memory = {**shared, "TrainConfig.init_from": anchor}
            if given.memory.mode == "scratch":  # what the gin files train on their own
                memory["MemoryConfig.mode"] = "cotrain"
            return memory
        baseline = {
            **shared,
            "MemoryConfig.kind": "none",
            "MemoryConfig.level_sizes": (),
            "MemoryConfig.mode": "scratch",
            "MemoryConfig.bank_tier": "device",
            "MemoryConfig.bank_store": "",
            "TrainConfig.init_from": "",
            "TrainConfig.steps": recipe.anchor_steps + given.steps,
        }
        try:
            baseline["TrainConfig.optim"] = gin.query_parameter("RecipeConfig.anchor_optim")
        except ValueError:  # not bound: the baseline's anchor uses OptimConfig as given
            pass
        return baseline

    def config(self, stage: str) -> TrainConfig:
        """`stage`'s TrainConfig; gin is left holding exactly that run's configuration."""
        bindings = self.bindings(stage)
        parse_gin(self.gin_files, self.gin_params)
        for name, value in bindings.items():
            gin.bind_parameter(name, value)
        return build_train_config()

    def check(self) -> None:
        """Config errors before any training: both runs must build, the memory run must be
        a memory run that starts from the anchor."""
        memory = self.config(MEMORY)
        if not memory.memory.enabled:
            raise ConfigError(
                "The recipe compares a memory run with an anchor-only baseline: "
                "set MemoryConfig.kind (e.g. 'ffn') and MemoryConfig.level_sizes."
            )
        self.config(BASELINE)


def run_recipe(recipe: Recipe, say: Callable[[str], None] = print) -> bool:
    """Train (or resume) both runs; False when a signal stopped a stage early (it
    checkpointed, and running the recipe again goes on from there)."""
    from hmem_jax.train.layout import (
        check_paths,
        check_resume,
        ensure_tree,
        make_loader,
        write_run_config,
    )
    from hmem_jax.train.lease import WorkdirLease
    from hmem_jax.train.loop import train
    from hmem_jax.train.resume import fingerprint

    memory = recipe.config(MEMORY)
    check_paths(memory, recipe.stage_dir(MEMORY))  # before the tree is fitted into the workdir
    fits_tree = memory.tree_dir == paths.join(recipe.workdir, "tree")
    # With no tree given, WORKDIR/tree is fitted as a memory run fits its own.
    ensure_tree(dataclasses.replace(memory, tree_dir="") if fits_tree else memory, recipe.workdir)
    anchor_steps = recipe.settings().anchor_steps
    stages: Sequence[tuple[str, int | None]] = (
        (BASELINE, anchor_steps),
        (MEMORY, None),
        (BASELINE, None),
    )
    for stage, until in stages:
        cfg = recipe.config(stage)
        workdir = recipe.stage_dir(stage)
        say(f"hmem_jax recipe: {stage} run, steps to {until or cfg.steps} ({workdir})")
        check_paths(cfg, workdir)
        with WorkdirLease(workdir):
            loader = make_loader(cfg, workdir)
            data_fingerprint = fingerprint(loader.fingerprint)
            check_resume(cfg, workdir, data_fingerprint)
            write_run_config(cfg, workdir)
            if train(cfg, workdir, loader, data_fingerprint, until_step=until).stopped_by:
                return False
    return True
