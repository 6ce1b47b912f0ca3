"""The paper's two-phase recipe and its equal-budget baseline, trained as one resumable job.

    WORKDIR/tree, WORKDIR/data   one ClusterTree and one prepared corpus for both runs
    WORKDIR/baseline             anchor only, anchor_steps + steps steps, one schedule
    WORKDIR/memory               anchor from baseline/checkpoints/<anchor_steps>, then
                                 anchor + memory for `steps` steps (mode 'cotrain')

The paper pretrains the anchor, then co-trains anchor and memory on as many
tokens again, and compares with an anchor-only model given the same total
budget. Here the baseline *is* the anchor's pretraining continued without
memory: both runs share their first `anchor_steps` steps bit for bit, see the
same number of tokens, and differ only in what the second phase trains.
Stages run in the order baseline (to anchor_steps), memory, baseline (to the
end); each stage resumes from its own checkpoints, so re-running the job
after an interruption continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import os

from hmem_jax.config import ConfigError, RecipeConfig, TrainConfig
from hmem_jax.train.layout import ensure_tree, make_loader, prepared_dir_of, write_run_config

BASELINE, MEMORY = "baseline", "memory"


def anchor_checkpoint(workdir: str, recipe: RecipeConfig) -> str:
    """The baseline checkpoint the memory run starts from (its `TrainConfig.init_from`)."""
    return os.path.join(workdir, BASELINE, "checkpoints", str(recipe.anchor_steps))


@dataclasses.dataclass(frozen=True)
class RecipeRuns:
    workdir: str
    recipe: RecipeConfig
    baseline: TrainConfig
    memory: TrainConfig

    def stage_dir(self, name: str) -> str:
        return os.path.join(self.workdir, name)


def recipe_runs(memory: TrainConfig, recipe: RecipeConfig, workdir: str) -> RecipeRuns:
    """Both runs' configurations. `memory.init_from` must be `anchor_checkpoint(...)`."""
    if not memory.memory.enabled:
        raise ConfigError("The recipe compares a memory run with an anchor-only baseline: set "
                          "MemoryConfig.kind (e.g. 'ffn') and MemoryConfig.level_sizes.")
    if memory.memory.mode == "scratch":
        raise ConfigError("The recipe starts the memory run from the pretrained anchor: set "
                          "MemoryConfig.mode = 'cotrain' (or 'frozen_anchor').")
    expected = anchor_checkpoint(workdir, recipe)
    if os.path.abspath(memory.init_from) != os.path.abspath(expected):
        raise ConfigError(f"TrainConfig.init_from = {memory.init_from!r}: the recipe sets it "
                          f"itself (to {expected!r}); remove the binding.")
    shared_data = dataclasses.replace(memory.data, prepared_dir=prepared_dir_of(memory, workdir))
    memory = dataclasses.replace(memory, data=shared_data,
                                 tree_dir=memory.tree_dir or os.path.join(workdir, "tree"))
    no_memory = dataclasses.replace(memory.memory, kind="none", level_sizes=(), bank_store="",
                                    mode="scratch", bank_tier="device")
    baseline = dataclasses.replace(memory, memory=no_memory, optim=recipe.anchor_optim,
                                   steps=recipe.anchor_steps + memory.steps, init_from="")
    return RecipeRuns(workdir=workdir, recipe=recipe, baseline=baseline, memory=memory)


def run_recipe(runs: RecipeRuns, say=print) -> dict[str, str]:
    """Train (or resume) both runs; returns stage name -> its workdir."""
    from hmem_jax.train.loop import fingerprint, train

    ensure_tree(runs.memory, runs.workdir)
    stages = ((BASELINE, runs.baseline, runs.recipe.anchor_steps),
              (MEMORY, runs.memory, None),
              (BASELINE, runs.baseline, None))
    for name, cfg, until in stages:
        workdir = runs.stage_dir(name)
        steps = until or cfg.steps
        say(f"hmem_jax recipe: {name} run, steps to {steps} ({workdir})")
        write_run_config(cfg, workdir)
        loader = make_loader(cfg, workdir)
        train(cfg, workdir, loader, fingerprint(loader.fingerprint), until_step=until)
    return {BASELINE: runs.stage_dir(BASELINE), MEMORY: runs.stage_dir(MEMORY)}
