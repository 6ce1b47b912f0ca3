"""The jitted training step: masked next-token loss, gradient accumulation, AdamW update.

The loss of a step is the mean over all predicted tokens of the global
batch. Gradient accumulation sums loss numerators, token counts and gradients
over micro-batches and divides once, so k micro-batches give the same update
as one batch of k times the size (up to float summation order).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from hmem_jax import sharding
from hmem_jax.model import Transformer
from hmem_jax.train.state import TrainState

Batch = Mapping[str, jax.Array]


def next_token_targets(tokens: jax.Array, segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """targets[B, T] and weights[B, T]: position t predicts token t+1 of the same document.

    The last position of a document (whose next token belongs to another
    document or is padding) and padding itself carry no loss.
    """
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    next_segment = jnp.concatenate([segment_ids[:, 1:], jnp.zeros_like(segment_ids[:, :1])], axis=1)
    weights = (segment_ids != 0) & (next_segment == segment_ids)
    return targets, weights.astype(jnp.float32)


def cross_entropy_sum(logits: jax.Array, targets: jax.Array,
                      weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted token losses, sum of weights), in float32."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((log_z - target_logit) * weights), jnp.sum(weights)


def loss_sums(model: Transformer, params: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(loss numerator, token count) of one (micro-)batch."""
    logits = model.apply({"params": params}, batch["tokens"], batch["segment_ids"],
                         batch["positions"], batch.get("memory"))
    targets, weights = next_token_targets(batch["tokens"], batch["segment_ids"])
    return cross_entropy_sum(logits, targets, weights)


def _split_micro_batches(batch: Batch, k: int) -> Batch:
    """[B, ...] -> [k, B/k, ...], micro-batch i = rows i, i+k, i+2k, ...

    Strided, so each device's contiguous rows feed every micro-batch equally
    and no micro-batch lives on a subset of the devices.
    """
    def split(x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0] // k, k) + x.shape[1:])
        x = jnp.swapaxes(x, 0, 1)
        return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))
    return {name: split(value) for name, value in batch.items()}


def accumulate_gradients(model: Transformer, params: Any, batch: Batch,
                         micro_batches: int) -> tuple[jax.Array, jax.Array, Any]:
    """(loss numerator, token count, gradient of the numerator) over `micro_batches` slices."""
    grad_fn = jax.value_and_grad(lambda p, b: loss_sums(model, p, b), has_aux=True)
    if micro_batches == 1:
        (loss_sum, count), grads = grad_fn(params, batch)
        return loss_sum, count, grads

    def body(carry: tuple, micro: Batch) -> tuple[tuple, None]:
        loss_acc, count_acc, grad_acc = carry
        (loss_sum, count), grads = grad_fn(params, micro)
        grad_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_acc, grads)
        return (loss_acc + loss_sum, count_acc + count, grad_acc), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
    (loss_sum, count, grads), _ = jax.lax.scan(body, init,
                                               _split_micro_batches(batch, micro_batches))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return loss_sum, count, grads


def train_step(model: Transformer, tx: optax.GradientTransformation, schedule: optax.Schedule,
               micro_batches: int, state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
    """One optimizer step; metrics are device scalars (read them a step late)."""
    loss_sum, count, grads = accumulate_gradients(model, state.params, batch, micro_batches)
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: (g / count).astype(g.dtype), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "train/loss": loss_sum / count,
        "train/grad_norm": optax.tree.norm(grads),
        "train/lr": schedule(state.step),
        "train/tokens": count,
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def compile_train_step(model: Transformer, tx: optax.GradientTransformation,
                       schedule: optax.Schedule, micro_batches: int, mesh: Mesh, rules: Any,
                       state_shardings: TrainState) -> Callable[[TrainState, Batch],
                                                                 tuple[TrainState, dict]]:
    """`train_step` under `jax.jit` with explicit shardings; the old state is donated."""
    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        return train_step(model, tx, schedule, micro_batches, state, batch)

    jitted = jax.jit(step, in_shardings=(state_shardings, None),
                     out_shardings=(state_shardings, sharding.replicated(mesh)),
                     donate_argnums=(0,))

    def run(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        with sharding.activate(mesh, rules):
            return jitted(state, batch)
    return run
