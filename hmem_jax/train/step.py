"""The jitted training step: masked next-token loss, gradient accumulation, global-norm
clipping, AdamW for the anchor and sparse AdamW for the fetched memory blocks.

The loss of a step is the mean over all predicted tokens of the global
batch. Gradient accumulation sums loss numerators, token counts and gradients
over micro-batches and divides once, so k micro-batches give the same update
as one batch of k times the size (up to float summation order). Clipping
uses the joint norm of the anchor's and the fetched blocks' gradients: both
are parameters of one model for this step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from hmem_jax import sharding
from hmem_jax.bank.exchange import BlockExchange
from hmem_jax.config import TrainConfig
from hmem_jax.data.batch import MODEL_INPUTS, SEGMENT_IDS, TOKENS
from hmem_jax.model import Transformer
from hmem_jax.train.memory import MemoryPlan, View, memory_schedule
from hmem_jax.train.optimizer import learning_rate_schedule
from hmem_jax.train.state import TrainState

Batch = Mapping[str, jax.Array]
LossFn = Callable[[Any, Batch], tuple[jax.Array, jax.Array]]


def next_token_targets(tokens: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """targets[B, T] and weights[B, T]: position t predicts token t+1 of the same document.

    The last position of a document (whose next token belongs to another
    document or is padding) and padding itself carry no loss.
    """
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    next_segment = jnp.concatenate([segment_ids[:, 1:], jnp.zeros_like(segment_ids[:, :1])], axis=1)
    weights = (segment_ids != 0) & (next_segment == segment_ids)
    return targets, weights.astype(jnp.float32)


def cross_entropy_sum(
    logits: jax.Array, targets: jax.Array, weights: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted token losses, sum of weights), in float32."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((log_z - target_logit) * weights), jnp.sum(weights)


def loss_sums(
    model: Transformer, params: Any, batch: Batch, memory: Any = None
) -> tuple[jax.Array, jax.Array]:
    """(loss numerator, token count) of one (micro-)batch."""
    logits: jax.Array = model.apply(  # type: ignore[assignment]
        {"params": params}, *(batch[key] for key in MODEL_INPUTS), memory
    )
    targets, weights = next_token_targets(batch[TOKENS], batch[SEGMENT_IDS])
    return cross_entropy_sum(logits, targets, weights)


def _split_micro_batches(batch: Batch, k: int) -> Batch:
    """[B, ...] -> [k, B/k, ...], micro-batch i = rows i, i+k, i+2k, ...

    Strided, so each device's contiguous rows feed every micro-batch equally
    and no micro-batch lives on a subset of the devices.
    """

    def split(x: jax.Array) -> jax.Array:
        x = jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
        return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))

    return {name: split(value) for name, value in batch.items()}


def accumulate_gradients(
    loss_fn: LossFn, trainable: Any, batch: Batch, micro_batches: int
) -> tuple[jax.Array, jax.Array, Any]:
    """(loss numerator, token count, gradient of the numerator) over `micro_batches` slices."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if micro_batches == 1:
        (loss_sum, count), grads = grad_fn(trainable, batch)
        return loss_sum, count, grads

    def body(carry: tuple, micro: Batch) -> tuple[tuple, None]:
        loss_acc, count_acc, grad_acc = carry
        (loss_sum, count), grads = grad_fn(trainable, micro)
        grad_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_acc, grads)
        return (loss_acc + loss_sum, count_acc + count, grad_acc), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
    (loss_sum, count, grads), _ = jax.lax.scan(
        body, init, _split_micro_batches(batch, micro_batches)
    )
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trainable)
    return loss_sum, count, grads


@dataclasses.dataclass(frozen=True)
class StepFunctions:
    """What the step needs besides state and batch (static under jit)."""

    model: Transformer
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    micro_batches: int
    grad_clip: float
    plan: MemoryPlan | None = None
    memory_schedule: optax.Schedule | None = None
    freeze_anchor: bool = False
    host_bank: bool = False  # the bank lives outside the state (streamed tier): rows in, rows out
    exchange: BlockExchange | None = None  # how blocks move between bank slices and shards

    @classmethod
    def for_run(
        cls,
        cfg: TrainConfig,
        model: Transformer,
        tx: optax.GradientTransformation,
        plan: MemoryPlan | None,
        mesh: Mesh,
        rules: Any,
        host_bank: bool,
    ) -> StepFunctions:
        """The step of a run of `cfg`: the training loop and the compile check build it here."""
        return cls(
            model=model,
            tx=tx,
            schedule=learning_rate_schedule(cfg.optim, cfg.steps),
            micro_batches=cfg.grad_accum_steps,
            grad_clip=cfg.optim.grad_clip,
            plan=plan,
            freeze_anchor=plan is not None and cfg.memory.mode == "frozen_anchor",
            host_bank=host_bank,
            exchange=BlockExchange.for_mesh(mesh, rules) if plan else None,
            memory_schedule=memory_schedule(cfg.memory, cfg.steps) if plan else None,
        )


BankRows = Mapping[str, Any]  # level key -> a host tier's view (ids, LevelBank rows, block ids)


def train_step(
    fns: StepFunctions, state: TrainState, batch: Batch, rows: BankRows | None = None
) -> tuple[TrainState, dict, dict | None]:
    """One optimizer step -> (state, metrics, updated bank rows for a host bank or None).

    Metrics are device scalars (read them a step late). With a device-resident
    bank the step reads and updates `state.bank`; with a host bank
    (`fns.host_bank`) it reads the step's `rows` and returns them updated, to be
    written back. The loss, the clip and the update are the same either way.
    """
    plan = fns.plan
    per_sequence = {key: batch[key] for key in MODEL_INPUTS}
    views: Mapping[str, View] = {}
    memory_params: dict[str, Any] = {}
    use_generic = None
    if plan is not None:
        assert fns.exchange is not None and fns.memory_schedule is not None, "a plan needs both"
        exchange, memory_schedule = fns.exchange, fns.memory_schedule
        if fns.host_bank:
            assert rows is not None, "a host bank's step needs the step's rows"
            views = rows
        else:
            views = plan.device_views(state.bank, batch)
        memory_params = plan.fetch(exchange, views)
        per_sequence.update({k: batch[k] for k in plan.sequence_keys()})
        if plan.with_generic:
            use_generic = plan.generic_mask(state.step, batch[TOKENS].shape[0])
            per_sequence["use_generic"] = use_generic

    def loss_fn(trainable: tuple[Any, Any], micro: Batch) -> tuple[jax.Array, jax.Array]:
        anchor, memory = trainable
        model_memory = None
        if plan is not None:
            model_memory = plan.model_memory(memory, micro, micro.get("use_generic"))
        return loss_sums(fns.model, anchor, micro, model_memory)

    if fns.freeze_anchor:
        frozen = jax.lax.stop_gradient(state.params)
        loss_sum, count, memory_grads = accumulate_gradients(
            lambda m, micro: loss_fn((frozen, m), micro),
            memory_params,
            per_sequence,
            fns.micro_batches,
        )
        anchor_grads = None
    else:
        loss_sum, count, (anchor_grads, memory_grads) = accumulate_gradients(
            loss_fn, (state.params, memory_params), per_sequence, fns.micro_batches
        )

    count = jnp.maximum(count, 1.0)
    anchor_grads, memory_grads = jax.tree.map(
        lambda g: (g / count).astype(g.dtype), (anchor_grads, memory_grads)
    )
    reduced = plan.reduce(exchange, views, memory_grads) if plan is not None else {}
    square_sum = sum((r.square_sum for r in reduced.values()), jnp.zeros((), jnp.float32))
    grad_norm = jnp.sqrt(jnp.square(optax.tree.norm(anchor_grads)) + square_sum)
    factor = jnp.ones((), jnp.float32)
    if fns.grad_clip > 0:
        factor = jnp.minimum(1.0, fns.grad_clip / (grad_norm + 1e-6))
    anchor_grads = jax.tree.map(lambda g: (g * factor).astype(g.dtype), anchor_grads)

    params, opt_state = state.params, state.opt_state
    if not fns.freeze_anchor:
        updates, opt_state = fns.tx.update(anchor_grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
    metrics = {
        "train/loss": loss_sum / count,
        "train/grad_norm": grad_norm,
        "train/lr": fns.schedule(state.step),
        "train/tokens": count,
    }
    bank, rows_out = state.bank, None
    if plan is not None:
        memory_lr = memory_schedule(state.step)
        new_views, update_metrics = plan.update(
            exchange, views, reduced, memory_lr, factor, use_generic, state.step
        )
        metrics.update(update_metrics)
        metrics.update(plan.fetch_metrics(views))
        if fns.host_bank:
            rows_out = new_views
        else:
            bank = {**state.bank, **new_views}
        metrics["mem/lr"] = memory_lr
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, bank=bank)
    return new_state, metrics, rows_out


@dataclasses.dataclass(frozen=True)
class CompiledTrainStep:
    """`train_step` under `jax.jit` for a mesh: run(state, batch, rows=None)."""

    jitted: jax.stages.Wrapped
    mesh: Mesh
    rules: Any

    def __call__(
        self, state: TrainState, batch: Batch, rows: BankRows | None = None
    ) -> tuple[TrainState, dict, dict | None]:
        with sharding.activate(self.mesh, self.rules):
            return self.jitted(state, batch, rows)

    def compiled(self, state: TrainState, batch: Batch, rows: BankRows | None = None) -> Any:
        """The compiled executable (for memory and cost analysis in benchmarks)."""
        with sharding.activate(self.mesh, self.rules):
            return self.jitted.lower(state, batch, rows).compile()


def compile_train_step(
    fns: StepFunctions, mesh: Mesh, rules: Any, state_shardings: TrainState
) -> CompiledTrainStep:
    """`train_step` under `jax.jit` with explicit shardings: run(state, batch, rows=None).

    The old state is donated, and so are a host bank's rows: the updated rows
    the step returns reuse their buffers, so a streamed step holds one copy of
    its rows, not two.
    """
    replicated = sharding.replicated(mesh)

    def step(state: TrainState, batch: Batch, rows: BankRows | None) -> tuple:
        return train_step(fns, state, batch, rows)

    # A host bank's updated rows keep the layout of the rows given (None: as computed).
    jitted = jax.jit(
        step,
        in_shardings=(state_shardings, None, None),
        out_shardings=(state_shardings, replicated, None),
        donate_argnums=(0, 2),
    )
    return CompiledTrainStep(jitted, mesh, rules)
