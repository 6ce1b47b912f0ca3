"""Train state (step, anchor parameters, optimizer state, memory bank), its shardings, and
sharded creation.

The state is created directly in its sharded layout: `jax.jit` with
`out_shardings` materialises each shard on its own device, so a model or bank
that does not fit one device never exists unsharded. The bank (device tier)
lives in the same state, so one orbax checkpoint holds anchor, optimizer,
bank, bank moments and per-block counts at the same step.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from hmem_jax import sharding
from hmem_jax.bank.exchange import BlockExchange
from hmem_jax.model import Transformer
from hmem_jax.train.memory import MemoryPlan


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer steps taken = index of the next batch
    params: Any
    opt_state: Any
    bank: Any = None  # dict level -> LevelBank (device tier), or None without memory


def _boxed_state(
    model: Transformer, tx: optax.GradientTransformation, plan: MemoryPlan | None, key: jax.Array
) -> TrainState:
    ids = jnp.zeros((1, 8), jnp.int32)
    params = model.init(key, ids, ids + 1, ids)["params"]
    # optax maps over the boxed tree, so the moments inherit each parameter's logical axes.
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        bank=plan.init_bank() if plan is not None else None,
    )


def state_shardings(
    model: Transformer,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: Any,
    plan: MemoryPlan | None = None,
) -> TrainState:
    """NamedShardings for every leaf of the (unboxed) train state; the bank's leaves are laid
    out as the step's block exchange reads them (`BlockExchange.spec`)."""
    abstract = jax.eval_shape(lambda: _boxed_state(model, tx, plan, jax.random.key(0)))
    specs = nn.get_partition_spec(abstract)
    shards = sharding.logical_to_sharding(specs.replace(bank=None), mesh, rules)
    if abstract.bank is None:
        return shards
    exchange = BlockExchange.for_mesh(mesh, rules)
    bank = jax.tree.map(lambda x: NamedSharding(mesh, exchange.spec(tuple(x.shape))), abstract.bank)
    return shards.replace(bank=bank)


def abstract_state(
    model: Transformer,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: Any,
    plan: MemoryPlan | None = None,
) -> TrainState:
    """ShapeDtypeStructs carrying shardings: the restore target for checkpoints."""
    shapes = jax.eval_shape(lambda: nn.meta.unbox(_boxed_state(model, tx, plan, jax.random.key(0))))
    shards = state_shardings(model, tx, mesh, rules, plan)
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shards
    )


def create_state(
    model: Transformer,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: Any,
    seed: int,
    plan: MemoryPlan | None = None,
    init_params: Any = None,
) -> TrainState:
    """Freshly initialised state, laid out on the mesh.

    `init_params` (e.g. a trained anchor, for co-training) replaces the
    initialised anchor parameters; the optimizer state starts fresh for them.
    """
    shards = state_shardings(model, tx, mesh, rules, plan)

    def init(key: jax.Array, params: Any) -> TrainState:
        state = nn.meta.unbox(_boxed_state(model, tx, plan, key))
        if params is not None:
            state = state.replace(params=params, opt_state=tx.init(params))
        return state

    with sharding.activate(mesh, rules):
        jitted = jax.jit(init, out_shardings=shards)
        return jitted(jax.random.key(seed), init_params)
