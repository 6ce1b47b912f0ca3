"""Ahead-of-time compilation of the real train step for a mesh, with no data, checkpoint or tree.

Why: whether a configuration fits a device, and what XLA makes of it, is known at compile time;
finding out after preparing a corpus and starting a job on hundreds of chips is too late. This
lowers and compiles the same `compile_train_step` the training loop runs (same model, optimizer,
`MemoryPlan`, bank tier and shardings) on abstract arguments: the train state's
`ShapeDtypeStruct`s from `abstract_state`, and a batch of the loader's static shapes (its
per-shard block lists of capacity min(B / S, clusters) per level, which the tree's geometry,
`HierarchyConfig.branching` and `depth`, fixes without any tree). Nothing is allocated but the
compiler's own memory, so the devices may be fake CPU devices or a TPU topology's compile-only
devices (`hmem_jax.main.compile`).

The step is the training loop's own: both build it with `StepFunctions.for_run`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from hmem_jax import sharding
from hmem_jax.bank import device as bank_lib
from hmem_jax.bank.exchange import BlockExchange
from hmem_jax.config import TrainConfig
from hmem_jax.data.batch import MODEL_INPUTS, block_ids_key, block_slots_key
from hmem_jax.model import Transformer
from hmem_jax.train.memory import MemoryPlan
from hmem_jax.train.metrics import train_flops_per_token
from hmem_jax.train.optimizer import make_optimizer
from hmem_jax.train.state import abstract_state, state_shardings
from hmem_jax.train.step import StepFunctions, compile_train_step


@dataclasses.dataclass(frozen=True)
class MemoryUse:
    """Bytes one device needs for the compiled step (XLA's `memory_analysis`)."""

    arguments: int
    outputs: int
    aliased: int  # outputs written into donated argument buffers: held once, not twice
    temporaries: int
    generated_code: int

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.generated_code

    @classmethod
    def of(cls, compiled: Any) -> MemoryUse:
        analysis = compiled.memory_analysis()
        return cls(
            arguments=int(analysis.argument_size_in_bytes),
            outputs=int(analysis.output_size_in_bytes),
            aliased=int(analysis.alias_size_in_bytes),
            temporaries=int(analysis.temp_size_in_bytes),
            generated_code=int(analysis.generated_code_size_in_bytes),
        )


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """A compiled train step and what it costs."""

    compiled: Any  # jax.stages.Compiled
    mesh: Mesh
    memory: MemoryUse  # per device
    xla_flops: float | None  # per device, as XLA counts them (None: the backend gives none)
    analytic_flops: float  # per step over all devices: train_flops_per_token x tokens
    counted_flops: float  # the analytic count of what XLA counts (`flops_as_xla_counts`)
    tokens: int  # per step


def flops_as_xla_counts(cfg: TrainConfig, plan: MemoryPlan | None) -> float:
    """The analytic FLOPs of a step as XLA's cost analysis counts them, over all devices.

    XLA counts a loop's body once, not once per trip: the scan over layers (decision 2) is one
    layer, and the scan over `grad_accum_steps` micro-batches is one micro-batch. So the count
    to hold XLA's figure against is `train_flops_per_token` of a one-layer anchor (memory of
    one memory layer's width) for one micro-batch's tokens; what it leaves out (norms,
    softmax, the optimizer) is a few percent.
    """
    one_layer = dataclasses.replace(cfg.model, num_layers=1)
    fetched = plan.geometry.fetched_params // len(plan.geometry.layers) if plan else 0
    micro_tokens = cfg.batch_size // cfg.grad_accum_steps * cfg.seq_len
    return train_flops_per_token(one_layer, cfg.seq_len, fetched) * micro_tokens


def xla_flops(compiled: Any) -> float | None:
    """The FLOPs XLA's cost analysis counts for one device's program (None if unavailable)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def abstract_batch(cfg: TrainConfig, plan: MemoryPlan | None, mesh: Mesh, rules: Any) -> dict:
    """The step's batch as the loop passes it (`sharding.global_batch` of the loader's keys):
    ShapeDtypeStructs of the global shapes, each split over the batch shards."""
    shards = sharding.batch_shards(mesh, rules)
    b, t = cfg.batch_size, cfg.seq_len
    shapes: dict[str, tuple[int, ...]] = {key: (b, t) for key in MODEL_INPUTS}
    if plan is not None:
        for level in plan.levels:
            shapes[block_slots_key(level)] = (b,)
            shapes[block_ids_key(level)] = (shards, _capacity(cfg, plan, shards, level))
    return {
        key: jax.ShapeDtypeStruct(
            shape, jnp.int32, sharding=sharding.batch_sharding(mesh, rules, len(shape))
        )
        for key, shape in shapes.items()
    }


def _capacity(cfg: TrainConfig, plan: MemoryPlan, shards: int, level: int) -> int:
    """The loader's static block-list length of a batch shard at `level` (`Loader._capacities`)."""
    return min(cfg.batch_size // shards, plan.geometry.clusters(level))


def abstract_rows(
    cfg: TrainConfig, plan: MemoryPlan, mesh: Mesh, rules: Any, exchange: BlockExchange
) -> dict:
    """A streamed bank's step rows as `bank/tier.py::StreamedTier.rows` hands them to the step:
    per level, (each shard's positions in the rows, the rows of the global batch's distinct
    blocks laid out like the device bank, their block ids)."""
    shards = sharding.batch_shards(mesh, rules)
    bank = jax.eval_shape(plan.init_bank)
    rows = {}
    for key, level in bank.items():
        if key == bank_lib.GENERIC:
            union, capacity = 1, 1
        else:
            capacity = _capacity(cfg, plan, shards, int(key[1:]))
            union = min(shards * capacity, level.count.shape[0])

        def leaf(x: jax.ShapeDtypeStruct, union: int = union) -> jax.ShapeDtypeStruct:
            shape = (union,) + tuple(x.shape[1:])
            return jax.ShapeDtypeStruct(
                shape, x.dtype, sharding=NamedSharding(mesh, exchange.spec(shape))
            )

        positions = jax.ShapeDtypeStruct(
            (shards, capacity), jnp.int32, sharding=sharding.batch_sharding(mesh, rules, 2)
        )
        ids = jax.ShapeDtypeStruct((union,), jnp.int32, sharding=sharding.replicated(mesh))
        rows[key] = (positions, jax.tree.map(leaf, level), ids)
    return rows


def compile_step(
    cfg: TrainConfig, devices: Sequence[Any], slice_ids: Sequence[int] | None = None
) -> CompiledStep:
    """Lower and compile `cfg`'s train step for a mesh of `devices` (`slice_ids`: the slice of
    each device, for meshes across slices; see `sharding.build_mesh`).

    A mesh the devices cannot form, or a batch that does not divide over its batch shards,
    raises ConfigError before anything is compiled.
    """
    mesh = sharding.build_mesh(cfg.mesh, devices, slice_ids)
    rules = sharding.rules_of(cfg.mesh)
    cfg.check_batch_shards(sharding.batch_shards(mesh, rules), str(dict(mesh.shape)))
    plan = MemoryPlan.from_config(cfg)
    frozen = plan is not None and cfg.memory.mode == "frozen_anchor"
    model = Transformer(cfg.model, lora_scale=plan.lora_scale if plan else 1.0)
    tx = make_optimizer(cfg.optim, cfg.steps, frozen=frozen)
    host_bank = plan is not None and cfg.memory.bank_tier == "streaming"
    state_plan = None if host_bank else plan
    fns = StepFunctions.for_run(cfg, model, tx, plan, mesh, rules, host_bank=host_bank)
    step = compile_train_step(fns, mesh, rules, state_shardings(model, tx, mesh, rules, state_plan))
    state = abstract_state(model, tx, mesh, rules, state_plan)
    batch = abstract_batch(cfg, plan, mesh, rules)
    rows = None
    if host_bank:
        assert plan is not None and fns.exchange is not None
        rows = abstract_rows(cfg, plan, mesh, rules, fns.exchange)
    compiled = step.compiled(state, batch, rows)
    tokens = cfg.batch_size * cfg.seq_len
    fetched = plan.geometry.fetched_params if plan else 0
    return CompiledStep(
        compiled=compiled,
        mesh=mesh,
        memory=MemoryUse.of(compiled),
        xla_flops=xla_flops(compiled),
        analytic_flops=train_flops_per_token(cfg.model, cfg.seq_len, fetched) * tokens,
        counted_flops=flops_as_xla_counts(cfg, plan),
        tokens=tokens,
    )
