"""Subtree-parallel frozen-anchor training: each job trains only its level-1 subtree, and the
merged bank answers every prompt exactly as the job that owns the prompt's subtree."""

import jax
import numpy as np
import pytest

from hmem_jax.bank.device import GENERIC, LevelBank
from hmem_jax.bank.merge import merge_banks, owning_subtree


def _bank(value, clusters=(2, 4), with_generic=True):
    def level(n):
        full = np.full((n, 1, 3), value, np.float32)
        return LevelBank(
            params={"w": full},
            mu={"w": full},
            nu={"w": full},
            count=np.full(n, int(value), np.int32),
        )

    bank = {f"l{i + 1}": level(n) for i, n in enumerate(clusters)}
    if with_generic:
        bank[GENERIC] = level(1)
    return bank


def test_each_block_comes_from_the_job_of_its_level_one_ancestor():
    assert owning_subtree(2, np.arange(4), 2).tolist() == [0, 0, 1, 1]
    assert owning_subtree(3, np.arange(8), 2).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    merged = merge_banks([_bank(1.0), _bank(3.0)], subtrees=[1, 0], branching=2)
    assert merged["l1"].params["w"][:, 0, 0].tolist() == [3.0, 1.0]
    assert merged["l2"].params["w"][:, 0, 0].tolist() == [3.0, 3.0, 1.0, 1.0]
    assert merged["l2"].count.tolist() == [3, 3, 1, 1]
    # The shared generic block: the count-weighted mean (1 and 3 updates -> 0.25 * 1 + 0.75 * 3).
    assert merged[GENERIC].params["w"][0, 0, 0] == pytest.approx(2.5)
    assert merged[GENERIC].count.tolist() == [4]


def _train(cfg_params, workdir, prepared, extra):
    import gin

    from hmem_jax.data.loader import Loader
    from hmem_jax.main.common import load_train_config
    from hmem_jax.train.loop import train
    from hmem_jax.train.resume import fingerprint

    cfg = load_train_config((), cfg_params + tuple(extra))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.gin").write_text(gin.config_str())
    loader = Loader(
        prepared,
        cfg.batch_size,
        cfg.seq_len,
        cfg.seed,
        subtree=cfg.subtree if cfg.subtree >= 0 else None,
    )
    train(cfg, str(workdir), loader, fingerprint(loader.fingerprint), devices=jax.devices()[:1])
    return str(workdir)


@pytest.mark.slow  # an anchor run, two subtree jobs and a merge (~50 s on 2 cores)
@pytest.mark.ci
def test_merged_subtree_jobs_answer_like_the_job_of_each_prompts_subtree(
    small_prepared_tree_data, tmp_path
):
    from hmem_jax.bank.merge import merge_subtree_runs
    from hmem_jax.hierarchy.tree import ClusterTree
    from hmem_jax.infer.engine import Engine
    from hmem_jax.infer.probe import read_probe_file, run_probe
    from hmem_jax.infer.run import load_run

    prepared, tree_dir, params = small_prepared_tree_data
    items = read_probe_file(f"{prepared}/probes.jsonl")
    tree = ClusterTree.load(tree_dir)
    level1 = tree.route_texts([item.prompt for item in items], tree.make_embedder())[:, 0]
    subtrees = tuple(int(s) for s in np.argsort(-np.bincount(level1, minlength=4))[:2])
    common = params + (
        "TrainConfig.batch_size = 8",
        "TrainConfig.steps = 6",
        "TrainConfig.checkpoint_every = 6",
        "TrainConfig.async_checkpointing = False",
        "MeshConfig.fsdp = 1",
    )
    anchor = _train(common, tmp_path / "anchor", prepared, ())
    memory = (
        "MemoryConfig.kind = 'ffn'",
        "MemoryConfig.level_sizes = (8, 4)",
        "MemoryConfig.mode = 'frozen_anchor'",
        "MemoryConfig.lr = 1e-2",
        "MemoryConfig.generic_probability = 0.25",
        f"TrainConfig.init_from = '{anchor}'",
    )
    # The two level-1 subtrees most probes route into, one job each.
    jobs = [
        _train(common, tmp_path / f"job{s}", prepared, memory + (f"TrainConfig.subtree = {s}",))
        for s in subtrees
    ]
    for subtree, job in zip(subtrees, jobs):
        counts = load_run(job).bank["l2"].count
        owner = owning_subtree(2, np.arange(len(counts)), 4)
        assert np.all(np.asarray(counts)[owner != subtree] == 0)  # never touched another subtree
        assert np.any(np.asarray(counts)[owner == subtree] > 0)
    merged = Engine(load_run(merge_subtree_runs(jobs, str(tmp_path / "merged"))))
    assert merged.run.cfg.subtree == -1
    subtree_of = merged.block_ids([item.prompt for item in items])[:, 0]
    for subtree, job in zip(subtrees, jobs):
        own = [item for item, s in zip(items, subtree_of) if s == subtree][:16]
        assert own, f"no probe routes into subtree {subtree}"
        engine = Engine(load_run(job))
        prompts = [item.prompt for item in own]
        a, b = merged.memory_for(prompts, "fetched"), engine.memory_for(prompts, "fetched")
        for name in a:
            np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))
        assert run_probe(merged, own, ["fetched"], max_new_tokens=4) == run_probe(
            engine, own, ["fetched"], max_new_tokens=4
        )
