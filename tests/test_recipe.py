"""The recipe command: an anchor-only baseline and a co-trained memory run of the same budget,
sharing their first steps, then one probe table of both."""

import json
import os

import pytest


def _recipe(workdir, params):
    from helpers.small import run_entry_point

    return run_entry_point("hmem_jax.main.recipe", workdir, params, 1)


@pytest.mark.slow
@pytest.mark.ci
def test_recipe_trains_baseline_and_memory_run_on_one_budget_and_probes_both(tmp_path):
    from helpers.small import SMALL_TREE_PARAMS

    workdir = tmp_path / "recipe"
    params = list(SMALL_TREE_PARAMS) + [
        "TrainConfig.batch_size = 8",
        "TrainConfig.log_every = 10",
        "TrainConfig.steps = 20",
        "RecipeConfig.anchor_steps = 20",
        "RecipeConfig.probe_limit = 20",
        "MemoryConfig.kind = 'ffn'",
        "MemoryConfig.level_sizes = (8, 8)",  # mode 'scratch': the recipe makes it 'cotrain'
        "MemoryConfig.lr = 1e-2",
    ]
    done = _recipe(workdir, params)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "baseline, anchor only (40 steps)" in out
    for row in (
        "memory run, fetched",
        "memory run, memory removed",
        "memory run, generic",
        "memory run, blocked",
        "memory run, oracle",
    ):
        assert row in out
    baseline = workdir / "baseline"
    assert sorted(os.listdir(baseline / "checkpoints"))[-1] == "40"
    memory_cfg = json.loads((workdir / "memory" / "config.json").read_text())
    assert memory_cfg["init_from"] == str(baseline / "checkpoints" / "20")
    assert memory_cfg["memory"]["mode"] == "cotrain"
    baseline_cfg = json.loads((baseline / "config.json").read_text())
    assert baseline_cfg["memory"]["kind"] == "none" and baseline_cfg["steps"] == 40
    # Both runs read the one tree and prepared corpus of the recipe folder.
    assert memory_cfg["data"]["prepared_dir"] == baseline_cfg["data"]["prepared_dir"]
    steps = [json.loads(line)["step"] for line in open(workdir / "memory" / "metrics.jsonl")]
    assert steps[-1] == 20
    table = json.loads((workdir / "probe.json").read_text())
    assert sum(table["memory run, fetched"]["n_per_bucket"]) == 20


@pytest.mark.parametrize(("given", "trained"), [("scratch", "cotrain"), ("frozen_anchor",) * 2])
def test_the_memory_stage_starts_from_the_anchor_in_the_mode_the_gin_files_allow(
    tmp_path, given, trained
):
    """Gin files that train memory from scratch on their own (experiments/default.gin) co-train
    from the baseline's anchor in the recipe; a frozen-anchor recipe stays frozen."""
    from hmem_jax.train.recipe import MEMORY, Recipe

    params = (
        "MemoryConfig.kind = 'ffn'",
        "HierarchyConfig.depth = 1",
        "MemoryConfig.level_sizes = (4,)",
        "RecipeConfig.anchor_steps = 7",
        f"MemoryConfig.mode = '{given}'",
    )
    recipe = Recipe(str(tmp_path), (), params)
    recipe.check()
    cfg = recipe.config(MEMORY)
    assert cfg.memory.mode == trained
    assert cfg.init_from == str(tmp_path / "baseline" / "checkpoints" / "7")


def test_a_runs_own_tree_of_another_embedder_is_refused_with_the_fix(tmp_path):
    import dataclasses

    import numpy as np

    from hmem_jax.config import ConfigError, HierarchyConfig, MemoryConfig, TrainConfig
    from hmem_jax.hierarchy import ClusterTree
    from hmem_jax.train.layout import ensure_tree

    vectors = np.eye(8, dtype=np.float32)
    ClusterTree.fit(
        vectors, HierarchyConfig(branching=2, depth=1, samples_per_step=8), "hashed"
    ).save(tmp_path / "tree")
    cfg = TrainConfig(
        memory=MemoryConfig(kind="ffn", level_sizes=(4,)),
        hierarchy=HierarchyConfig(embedder="hashed_idf", branching=2, depth=1),
    )
    with pytest.raises(ConfigError, match="HierarchyConfig.embedder = 'hashed'\" to continue"):
        ensure_tree(cfg, str(tmp_path))
    same = dataclasses.replace(cfg, hierarchy=dataclasses.replace(cfg.hierarchy, embedder="hashed"))
    assert ensure_tree(same, str(tmp_path)) == str(tmp_path / "tree")
