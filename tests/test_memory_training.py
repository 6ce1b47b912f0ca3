"""Memory-augmented training: sparse updates, lazy AdamW, modes, resume, sharding."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.training import assert_close_to_scale, memory_config

from hmem_jax import sharding
from hmem_jax.bank.sparse_adamw import row_rounding_keys, sparse_adamw, stochastic_round
from hmem_jax.config import MemoryConfig, MeshConfig
from hmem_jax.data.loader import Loader
from hmem_jax.train.loop import train
from hmem_jax.train.memory import MemoryPlan
from hmem_jax.train.resume import fingerprint


def _train(cfg, prepared, workdir, devices=None, **kwargs):
    devices = devices if devices is not None else jax.devices()[:1]
    loader = Loader(
        prepared,
        cfg.batch_size,
        cfg.seq_len,
        cfg.seed,
        batch_shards=sharding.batch_shards_for(cfg.mesh, len(devices)),
    )
    return train(
        cfg, str(workdir), loader, fingerprint(loader.fingerprint), devices=devices, **kwargs
    ), loader


def _losses(result):
    return np.array([result.losses[k] for k in sorted(result.losses)])


@pytest.mark.parametrize("mesh", [None, MeshConfig(data=2, fsdp=4)], ids=["1", "d2-f4"])
def test_only_fetched_blocks_change_and_counts_equal_fetches(
    tmp_path, small_prepared_tree_data, mesh
):
    prepared, _, params = small_prepared_tree_data
    cfg = memory_config(params, steps=5, **({"mesh": mesh} if mesh else {}))
    result, loader = _train(
        cfg, prepared, tmp_path / "run", devices=jax.devices() if mesh else None
    )
    initial = MemoryPlan.from_config(cfg).init_bank()
    for level in (1, 2):
        key = f"l{level}"
        fetched = np.zeros(4**level, int)
        for step in range(cfg.steps):
            ids = np.unique(loader.batch(step)[f"block_ids_l{level}"])  # one update per step
            np.add.at(fetched, ids[ids < 4**level], 1)
        bank = result.state.bank[key]
        np.testing.assert_array_equal(np.asarray(bank.count), fetched)
        untouched = fetched == 0
        assert (~untouched).any() and (level == 1 or untouched.any())
        for tree_name in ("params", "mu", "nu"):
            for name, value in getattr(bank, tree_name).items():
                before = np.asarray(getattr(initial[key], tree_name)[name])
                after = np.asarray(value)
                np.testing.assert_array_equal(after[untouched], before[untouched])
                if tree_name == "params" and name == "down":
                    assert not np.array_equal(after[~untouched], before[~untouched])


def test_lazy_adamw_on_a_block_equals_optax_adamw_on_that_block_alone():
    cfg = MemoryConfig(kind="ffn", level_sizes=(2,), weight_decay=0.01)
    rng = np.random.default_rng(0)
    param = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    opt = optax.adamw(0.05, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
    reference, opt_state = param, opt.init(param)
    rows = {"w": param[None]}
    mu, nu = {"w": jnp.zeros((1, 3, 4))}, {"w": jnp.zeros((1, 3, 4))}
    count = jnp.zeros(1, jnp.int32)
    for _ in range(6):
        grad = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
        updates, opt_state = opt.update(grad, opt_state, reference)
        reference = optax.apply_updates(reference, updates)
        rows, mu, nu, count = sparse_adamw(
            rows, {"w": grad[None]}, mu, nu, count, jnp.array([True]), jnp.float32(0.05), cfg
        )
    np.testing.assert_allclose(
        np.asarray(rows["w"][0]), np.asarray(reference), rtol=1e-5, atol=1e-6
    )
    assert int(count[0]) == 6
    frozen, *_ = sparse_adamw(
        rows, {"w": jnp.ones((1, 3, 4))}, mu, nu, count, jnp.array([False]), jnp.float32(0.05), cfg
    )
    np.testing.assert_array_equal(np.asarray(frozen["w"]), np.asarray(rows["w"]))


def test_resume_reproduces_losses_and_the_bank_exactly(tmp_path, small_prepared_tree_data):
    prepared, _, params = small_prepared_tree_data
    cfg = memory_config(params, steps=6)
    full, _ = _train(cfg, prepared, tmp_path / "full")
    first, _ = _train(cfg, prepared, tmp_path / "resumed", until_step=4)
    second, _ = _train(cfg, prepared, tmp_path / "resumed")
    assert {**first.losses, **second.losses} == full.losses
    for a, b in zip(jax.tree.leaves(full.state.bank), jax.tree.leaves(second.state.bank)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_run_split_over_8_devices_resumes_on_one(tmp_path, small_prepared_tree_data):
    """The bank keeps the model's shape whatever the mesh, so a checkpoint written with every
    block split 8 ways restores on one device and continues like a one-device run."""
    prepared, _, params = small_prepared_tree_data
    full, _ = _train(memory_config(params, steps=6), prepared, tmp_path / "full")
    split = memory_config(params, steps=6, mesh=MeshConfig(data=2, fsdp=4))
    first, _ = _train(split, prepared, tmp_path / "moved", devices=jax.devices(), until_step=3)
    second, _ = _train(memory_config(params, steps=6), prepared, tmp_path / "moved")
    losses = {**first.losses, **second.losses}
    np.testing.assert_allclose([losses[k] for k in sorted(losses)], _losses(full), rtol=2e-5)
    for a, b in zip(jax.tree.leaves(full.state.bank), jax.tree.leaves(second.state.bank)):
        assert_close_to_scale(b, a)


def test_frozen_anchor_keeps_the_anchor_bitwise_and_cotrain_moves_it(
    tmp_path, small_prepared_tree_data
):
    prepared, _, params = small_prepared_tree_data
    anchor_cfg = memory_config(params, steps=3, memory={"kind": "none"})
    anchor, _ = _train(anchor_cfg, prepared, tmp_path / "anchor")
    frozen_cfg = memory_config(
        params, steps=3, init_from=str(tmp_path / "anchor"), memory={"mode": "frozen_anchor"}
    )
    frozen, _ = _train(frozen_cfg, prepared, tmp_path / "frozen")
    for a, b in zip(jax.tree.leaves(anchor.state.params), jax.tree.leaves(frozen.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(frozen.state.bank["l1"].count.sum()) > 0
    # The memory starts with no effect: the first loss is the trained anchor's on that batch.
    cotrain_cfg = memory_config(
        params, steps=3, init_from=str(tmp_path / "anchor"), memory={"mode": "cotrain"}
    )
    cotrain, _ = _train(cotrain_cfg, prepared, tmp_path / "cotrain")
    assert cotrain.losses[1] == pytest.approx(frozen.losses[1], rel=1e-6)
    moved = [
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(anchor.state.params), jax.tree.leaves(cotrain.state.params))
    ]
    assert all(moved)


@pytest.fixture(scope="module")
def anchor_only_losses(tmp_path_factory, small_prepared_tree_data):
    """Losses of 2 steps without memory: what every freshly initialised memory must reproduce."""
    prepared, _, params = small_prepared_tree_data
    base, _ = _train(
        memory_config(params, steps=2, memory={"kind": "none"}),
        prepared,
        tmp_path_factory.mktemp("anchor_only"),
    )
    return base.losses


@pytest.mark.parametrize("kind", ["lora_qk", "lora_ov", "lora_ffn", "kv"])
def test_other_memory_types_start_without_effect_and_train(
    tmp_path, small_prepared_tree_data, anchor_only_losses, kind
):
    prepared, _, params = small_prepared_tree_data
    result, _ = _train(
        memory_config(params, steps=2, memory={"kind": kind}), prepared, tmp_path / "m"
    )
    assert result.losses[1] == pytest.approx(anchor_only_losses[1], rel=1e-6)
    zero_init = {"lora_qk": "q_b", "lora_ov": "v_b", "lora_ffn": "up_b", "kv": "values"}[kind]
    assert float(jnp.abs(result.state.bank["l1"].params[zero_init]).max()) > 0


@pytest.mark.parametrize(
    "mesh",
    [
        MeshConfig(data=2, fsdp=4),
        MeshConfig(data=8, fsdp=1),
        MeshConfig(data=2, fsdp=1, tensor=2, memory=2),
    ],
    ids=["d2-f4", "d8", "d2-t2-m2"],
)
def test_memory_training_on_8_devices_matches_one_device(tmp_path, small_prepared_tree_data, mesh):
    _check_8_devices_match_one(tmp_path, small_prepared_tree_data, mesh)


@pytest.mark.parametrize(
    "mesh, variant",
    [
        (MeshConfig(data=2, fsdp=2, memory=2), {"grad_accum_steps": 2}),
        (MeshConfig(data=2, fsdp=4), {"memory": {"application": "grouped"}}),
    ],
    ids=["d2-f2-m2-2-micro-batches", "d2-f4-grouped"],
)
def test_per_shard_blocks_with_micro_batches_and_grouped_application_match_one_device(
    tmp_path, small_prepared_tree_data, mesh, variant
):
    """Micro-batches keep each shard's rows together; the grouped application addresses the
    shards' blocks by global slot."""
    _check_8_devices_match_one(tmp_path, small_prepared_tree_data, mesh, **variant)


def _check_8_devices_match_one(tmp_path, small_prepared_tree_data, mesh, **variant):
    prepared, _, params = small_prepared_tree_data
    one, _ = _train(memory_config(params, steps=3, **variant), prepared, tmp_path / "one")
    cfg8 = memory_config(params, steps=3, mesh=mesh, **variant)
    eight, loader = _train(cfg8, prepared, tmp_path / "eight", devices=jax.devices())
    slices = mesh.data * mesh.fsdp * mesh.memory  # every device but the tensor axis
    shards = mesh.data * mesh.fsdp
    assert loader.batch(0)["block_ids_l2"].shape == (shards, 8 // shards)
    split = 0
    for leaf in jax.tree.leaves(eight.state.bank):
        held = leaf.addressable_shards[0].data.size
        assert held in (leaf.size, leaf.size // slices), leaf.sharding
        split += held < leaf.size
    assert split > 0
    np.testing.assert_allclose(_losses(one), _losses(eight), rtol=2e-5)
    # Adam divides by √v, so float summation-order differences in tiny gradients grow a little.
    for a, b in zip(jax.tree.leaves(one.state.bank), jax.tree.leaves(eight.state.bank)):
        assert_close_to_scale(b, a)


def test_stochastic_rounding_is_unbiased_and_keeps_representable_values():
    x = jnp.full((20000,), 1.0 + 2.0**-10, jnp.float32)  # 1/8 of the way to the next bf16
    rounded = stochastic_round(x, jnp.bfloat16, jax.random.key(0)).astype(jnp.float32)
    assert set(np.unique(np.asarray(rounded))) == {1.0, 1.0078125}
    assert abs(float(rounded.mean()) - (1.0 + 2.0**-10)) < 1e-4  # nearest is off by 9.8e-4
    exact = jnp.asarray(np.random.default_rng(0).normal(size=512), jnp.bfloat16)
    np.testing.assert_array_equal(
        np.asarray(stochastic_round(exact.astype(jnp.float32), jnp.bfloat16, jax.random.key(1))),
        np.asarray(exact),
    )


def _drift(dtype, rounding, steps=200, lr=1e-4):
    """Total movement of a [2, 32, 32] bank after `steps` lazy AdamW steps on noisy, consistent
    gradients, with entries of size 0.06-0.12 (bf16 spacing 4.9e-4 there: half of it > lr)."""
    rng = np.random.default_rng(0)
    start = rng.uniform(0.06, 0.12, (2, 32, 32)) * rng.choice([-1, 1], (2, 32, 32))
    direction = rng.normal(size=(2, 32, 32))
    cfg = MemoryConfig(kind="ffn", level_sizes=(2,), bank_rounding=rounding, weight_decay=0.0)
    rows = {"w": jnp.asarray(start, dtype)}
    mu = nu = {"w": jnp.zeros((2, 32, 32), jnp.float32)}
    count, ids = jnp.zeros(2, jnp.int32), jnp.arange(2)
    update = jax.jit(
        lambda r, g, m, v, c, k: sparse_adamw(
            r, g, m, v, c, jnp.ones(2, bool), jnp.float32(lr), cfg, k
        )
    )
    for step in range(steps):
        grad = {"w": jnp.asarray(direction + 0.5 * rng.normal(size=direction.shape), jnp.float32)}
        rows, mu, nu, count = update(
            rows, grad, mu, nu, count, row_rounding_keys(0, jnp.int32(step), 1, ids)
        )
    return np.asarray(rows["w"], np.float32) - np.asarray(jnp.asarray(start, dtype), np.float32)


def test_bf16_bank_with_stochastic_rounding_moves_like_the_float32_bank():
    reference = _drift(jnp.float32, "nearest")
    assert np.abs(reference).mean() > 0.01  # up to 200 steps of ~lr each
    nearest = _drift(jnp.bfloat16, "nearest")
    stochastic = _drift(jnp.bfloat16, "stochastic")
    assert np.abs(nearest).max() == 0.0  # every update below half a bf16 step: all lost
    # Unbiased: the bank moves as far along the float32 path as float32 does (within 3%);
    # each entry carries the rounding noise of a random walk, ~ spacing * sqrt(p (1-p) steps)
    # with p ~ lr / spacing, about 2.8e-3 against a mean movement of 1.4e-2.
    along = np.sum(stochastic * reference) / np.sum(reference * reference)
    assert abs(along - 1.0) < 0.03, along
    error = np.linalg.norm(stochastic - reference) / np.linalg.norm(reference)
    assert error < 0.25, error


def test_bf16_bank_trains_and_reports_the_share_of_entries_updates_change(
    tmp_path, small_prepared_tree_data
):
    prepared, _, params = small_prepared_tree_data
    changed = {}
    losses = {}
    for name, memory in (
        ("float32", {}),
        ("nearest", {"bank_dtype": "bfloat16", "bank_rounding": "nearest"}),
        ("stochastic", {"bank_dtype": "bfloat16"}),
    ):
        cfg = memory_config(params, steps=4, memory={"lr": 1e-4, "end_lr": 1e-4, **memory})
        result, _ = _train(cfg, prepared, tmp_path / name)
        losses[name] = _losses(result)
        rows = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
        shares = [r.get("mem/changed_fraction") for r in rows if r["step"] > 1]  # 1: lr 0
        changed[name] = np.mean(shares) if name != "float32" else None
        assert (shares[0] is None) == (name == "float32")  # reported for narrow banks only
        assert result.state.bank["l1"].params["down"].dtype == jnp.dtype(
            memory.get("bank_dtype", "float32")
        )
    # At lr 1e-4 rounding to nearest loses the updates of every entry larger than ~0.05
    # (the gate and up matrices); the metric shows it, and stochastic rounding moves more.
    assert changed["nearest"] < 0.6
    assert changed["stochastic"] > changed["nearest"]
    np.testing.assert_allclose(losses["stochastic"], losses["float32"], rtol=1e-3)
