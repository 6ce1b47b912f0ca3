"""Per-shard blocks on 8 devices: each shard gets exactly its blocks, shared blocks get the sum
of their shards' gradients, updates land on the step's blocks only (against numpy references)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from hmem_jax import sharding
from hmem_jax.bank.device import LevelBank
from hmem_jax.bank.exchange import BlockExchange, slice_axis
from hmem_jax.bank.sparse_adamw import element_counters
from hmem_jax.config import MeshConfig

BLOCKS, CAPACITY = 12, 3
SHAPES = {"split": (BLOCKS, 2, 16, 3), "whole": (BLOCKS, 3, 5)}  # 16 divides by 8; 3, 5 don't


def _exchange(shape):
    mesh = jax.make_mesh(shape, sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
    return BlockExchange.for_mesh(mesh, MeshConfig().rules)


def _shard_ids(shards, rng):
    """Sorted distinct ids per shard, padded with BLOCKS; block 4 on the first and last shard."""
    ids = np.full((shards, CAPACITY), BLOCKS, np.int32)
    for s in range(shards):
        chosen = set(rng.choice(BLOCKS, size=rng.integers(1, CAPACITY + 1), replace=False))
        if s in (0, shards - 1):
            chosen = set(sorted(chosen)[: CAPACITY - 1]) | {4}
        ids[s, : len(chosen)] = sorted(chosen)
    return ids


def _place(exchange, view, ids):
    view = {
        n: jax.device_put(x, NamedSharding(exchange.mesh, exchange.spec(x.shape)))
        for n, x in view.items()
    }
    batch = NamedSharding(exchange.mesh, PartitionSpec(exchange.batch_axes))
    return view, jax.device_put(ids, batch)


def test_slice_axis_takes_the_longest_dividing_axis_and_never_the_block_axis():
    assert slice_axis((16, 2, 16, 3), 8) == 2
    assert slice_axis((16, 8, 24), 8) == 2
    assert slice_axis((16, 3, 5), 8) is None
    assert slice_axis((16, 3, 5), 1) is None


@pytest.mark.parametrize(
    "shape", [(2, 4, 1, 1), (8, 1, 1, 1), (2, 1, 2, 2)], ids=["d2-f4", "d8", "d2-t2-m2"]
)
def test_each_shard_fetches_its_blocks_and_shared_blocks_get_summed_gradients(shape):
    exchange = _exchange(shape)
    shards, rng = exchange.shards, np.random.default_rng(0)
    view = {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}
    ids = _shard_ids(shards, rng)
    placed, placed_ids = _place(exchange, view, ids)
    assert placed["split"].addressable_shards[0].data.shape[2] == 16 // exchange.slices

    fetched = jax.jit(exchange.fetch)(placed, placed_ids)
    for name, x in view.items():
        np.testing.assert_array_equal(np.asarray(fetched[name]), x[np.minimum(ids, BLOCKS - 1)])

    # Gradients at padding slots are zero in a real step: no sequence points there.
    grads = {
        n: rng.normal(size=(shards, CAPACITY) + s[1:]).astype(np.float32)
        * (ids < BLOCKS).reshape((shards, CAPACITY) + (1,) * (len(s) - 1))
        for n, s in SHAPES.items()
    }
    reduced = jax.jit(exchange.reduce, static_argnums=2)(grads, placed_ids, BLOCKS, placed)
    union = np.asarray(reduced.union)
    distinct = np.unique(ids[ids < BLOCKS])
    np.testing.assert_array_equal(union[: len(distinct)], distinct)
    assert (union[len(distinct) :] == BLOCKS).all() and len(union) == exchange.slices * CAPACITY
    square_sum = 0.0
    for name in SHAPES:
        dense = np.zeros((BLOCKS + 1,) + SHAPES[name][1:])
        np.add.at(dense, ids, grads[name].astype(np.float64))
        np.testing.assert_allclose(
            np.asarray(reduced.grads[name])[: len(distinct)], dense[distinct], rtol=1e-6, atol=1e-6
        )
        square_sum += np.sum(dense[:BLOCKS] ** 2)
    # Block 4 is used by two shards: its gradient is their sum, counted once.
    assert 4 in distinct
    np.testing.assert_allclose(float(reduced.square_sum), square_sum, rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 4, 1, 1), (2, 1, 2, 2)], ids=["d2-f4", "d2-t2-m2"])
def test_update_writes_the_steps_blocks_only_and_knows_each_elements_place(shape):
    exchange = _exchange(shape)
    rng = np.random.default_rng(1)
    params = {n: rng.normal(size=s).astype(np.float32) for n, s in SHAPES.items()}
    ids = _shard_ids(exchange.shards, rng)
    placed, placed_ids = _place(exchange, params, ids)
    level = LevelBank(
        params=placed, mu=dict(placed), nu=dict(placed), count=jnp.zeros((BLOCKS,), jnp.int32)
    )
    grads = {
        n: np.zeros((exchange.shards, CAPACITY) + s[1:], np.float32) for n, s in SHAPES.items()
    }
    reduced = jax.jit(exchange.reduce, static_argnums=2)(grads, placed_ids, BLOCKS, placed)

    def rule(rows, grads, union, places, values):
        """New params = each element's flat index in its whole block (where the union is
        valid), so the test sees whether slices know their place."""
        valid = union < BLOCKS
        new = {}
        for name, x in rows.params.items():
            axis, offset, whole = places[name]
            counters = element_counters(x.shape[1:], whole, axis, offset).astype(jnp.float32)
            new[name] = jnp.where(valid.reshape((-1,) + (1,) * (x.ndim - 1)), counters + values, x)
        out = rows.replace(params=new, count=jnp.where(valid, rows.count + 1, rows.count))
        return out, ((jnp.sum(valid).astype(jnp.float32),), (jnp.zeros(()),))

    new, (valid_sum,) = jax.jit(exchange.update, static_argnums=2)(
        level, reduced, rule, jnp.float32(0.5)
    )
    touched = np.unique(ids[ids < BLOCKS])
    untouched = np.setdiff1d(np.arange(BLOCKS), touched)
    assert float(valid_sum) == len(touched) * exchange.slices  # a split extra: summed
    for name, shape_ in SHAPES.items():
        after = np.asarray(new.params[name])
        expected = np.arange(np.prod(shape_[1:]), dtype=np.float32).reshape(shape_[1:]) + 0.5
        np.testing.assert_array_equal(
            after[touched], np.broadcast_to(expected, after[touched].shape)
        )
        np.testing.assert_array_equal(after[untouched], params[name][untouched])
        np.testing.assert_array_equal(np.asarray(new.mu[name]), params[name])  # rule left mu
    count = np.zeros(BLOCKS, np.int32)
    count[touched] = 1
    np.testing.assert_array_equal(np.asarray(new.count), count)
