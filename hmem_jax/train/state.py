"""Train state (step, parameters, optimizer state), its shardings, and sharded creation.

The state is created directly in its sharded layout: `jax.jit` with
`out_shardings` materialises each parameter shard on its own device, so a
model that does not fit one device never exists unsharded.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from hmem_jax import sharding
from hmem_jax.model import Transformer


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken = index of the next batch
    params: Any
    opt_state: Any


def _boxed_state(model: Transformer, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
    ids = jnp.zeros((1, 8), jnp.int32)
    params = model.init(key, ids, ids + 1, ids)["params"]
    # optax maps over the boxed tree, so the moments inherit each parameter's logical axes.
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def state_shardings(model: Transformer, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: Any) -> TrainState:
    """NamedShardings for every leaf of the (unboxed) train state."""
    abstract = jax.eval_shape(lambda: _boxed_state(model, tx, jax.random.key(0)))
    return sharding.logical_to_sharding(nn.get_partition_spec(abstract), mesh, rules)


def abstract_state(model: Transformer, tx: optax.GradientTransformation, mesh: Mesh,
                   rules: Any) -> TrainState:
    """ShapeDtypeStructs carrying shardings: the restore target for checkpoints."""
    shapes = jax.eval_shape(lambda: nn.meta.unbox(_boxed_state(model, tx, jax.random.key(0))))
    shards = state_shardings(model, tx, mesh, rules)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shards)


def create_state(model: Transformer, tx: optax.GradientTransformation, mesh: Mesh, rules: Any,
                 seed: int) -> TrainState:
    """Freshly initialised state, laid out on the mesh."""
    shards = state_shardings(model, tx, mesh, rules)
    with sharding.activate(mesh, rules):
        init = jax.jit(lambda key: nn.meta.unbox(_boxed_state(model, tx, key)),
                       out_shardings=shards)
        return init(jax.random.key(seed))
