"""Sparse (lazy) AdamW for memory blocks (docs/design.md decision 4).

Why lazy: a step touches a few hundred of the bank's 70k blocks. Dense AdamW
would decay every block's moments and apply weight decay to every block each
step, which costs a full pass over a 4.6B-21B parameter bank (and, for the
streamed tier, a full read and write of it) and shrinks untouched blocks
towards zero for no reason. Lazy AdamW updates only the fetched blocks: each
block keeps its own update count t for bias correction, so a block's t-th
update is exactly AdamW's t-th step on that block's own gradient sequence.
Decoupled weight decay is applied to fetched blocks only. Moments live beside
the blocks (same ids, configurable dtype), so a bank tier stores and moves
them together.

Update for each valid row (t = count + 1, lr from the memory schedule):
    m ← β1·m + (1-β1)·g          v ← β2·v + (1-β2)·g²
    p ← p - lr·( (m / (1-β1^t)) / (√(v / (1-β2^t)) + ε) + wd·p )

Narrow banks (bf16, as the paper stores them): the update is computed in
float32, then stored. Rounded to nearest, an update smaller than half the
gap between neighbouring bf16 values (2^-9 of the value) is lost, and at the
memory phase's rates (1e-4 → 1e-5 per step, for entries of size ~0.02-0.1)
nearly all of them are. Stochastic rounding (`MemoryConfig.bank_rounding`)
stores the upper or lower neighbour with the probability that makes the
stored value equal the float32 one in expectation, so small updates add up
as they would in float32. Chosen over float32 master rows because the bank
then stays 2 bytes per parameter everywhere it lives and moves (store,
host cache, device, checkpoints) instead of 4; the moments, which need the
precision, stay in `moment_dtype` (float32 by default). The random number
of an element is a function of (seed, step, level, block id) and the
element's place in its block alone (a counter-based hash), so every bank
tier and layout, whole blocks or slices of them, rounds a block identically.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from hmem_jax.config import MemoryConfig

Array = jax.Array


def _mix(x: Array) -> Array:
    """A 32-bit integer finaliser (lowbias32): every input bit moves about half the output."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def uniform_at(key: Array, counters: Array) -> Array:
    """float32 in [0, 1) for each uint32 counter: a hash of (key, counter), so any subset of a
    block's elements gets the same numbers as the whole block would."""
    words = jax.random.key_data(key).reshape(-1).astype(jnp.uint32)
    x = _mix(counters * jnp.uint32(0x9E3779B9) ^ words[0])
    x = _mix(x ^ words[-1])
    return (x >> 8).astype(jnp.float32) * jnp.float32(1.0 / (1 << 24))


def element_counters(
    shape: tuple[int, ...], whole: tuple[int, ...] | None = None, axis: int = 0, offset: Any = 0
) -> Array:
    """uint32[shape]: each element's flat index in a whole row of shape `whole`, for a slice
    of it that starts at `offset` along `axis` (the whole row itself by default)."""
    grid = list(jnp.indices(shape, dtype=jnp.int32))
    grid[axis] = grid[axis] + offset
    return jnp.ravel_multi_index(tuple(grid), whole or shape, mode="wrap").astype(jnp.uint32)


def stochastic_round(x: Array, dtype: Any, key: Array, counters: Array | None = None) -> Array:
    """float32 `x` as `dtype`, rounded up or down at random so that E[result] = x.

    The nearest value of `dtype` and its neighbour on the other side of x are
    chosen with probabilities inversely proportional to their distance to x;
    values `dtype` represents exactly are returned unchanged. `counters` (see
    `element_counters`) name each element's place, default its index in `x`.
    """
    nearest = x.astype(dtype)
    near = nearest.astype(jnp.float32)
    toward = jnp.where(x > near, jnp.inf, -jnp.inf).astype(dtype)
    other = jnp.nextafter(nearest, toward)
    gap = other.astype(jnp.float32) - near
    chance = jnp.where(gap != 0, (x - near) / jnp.where(gap != 0, gap, 1.0), 0.0)
    if counters is None:
        counters = element_counters(x.shape)
    return jnp.where(uniform_at(key, counters) < chance, other, nearest)


def row_rounding_keys(seed: int, step: Array, level: int, ids: Array) -> Array:
    """One PRNG key per row, from (seed, step, level, block id): layout-independent."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), level)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)


def sparse_adamw(
    params: Mapping[str, Array],
    grads: Mapping[str, Array],
    mu: Mapping[str, Array],
    nu: Mapping[str, Array],
    count: Array,
    valid: Array,
    lr: Array,
    cfg: MemoryConfig,
    rounding_keys: Array | None = None,
    counters: Mapping[str, Array] | None = None,
) -> tuple[dict, dict, dict, Array]:
    """One lazy AdamW step on gathered rows.

    params/grads/mu/nu[name]: [U, ...]; count: int32[U] updates received so far;
    valid: bool[U] rows to update (padding rows are returned unchanged);
    rounding_keys: [U] keys (`row_rounding_keys`) for stochastic rounding of
    narrow params when `cfg.bank_rounding` is 'stochastic'; None rounds to nearest;
    counters[name]: the elements' places in a whole row (`element_counters`) when the rows
    are slices of blocks; default the row's own indices.
    Returns (params, mu, nu, count), the rows to write back.
    """
    t = (count + 1).astype(jnp.float32)
    correction1 = 1.0 - cfg.b1**t
    correction2 = 1.0 - cfg.b2**t
    new_params, new_mu, new_nu = {}, {}, {}
    for i, (name, p) in enumerate(sorted(params.items())):
        g = grads[name].astype(jnp.float32)
        m = cfg.b1 * mu[name].astype(jnp.float32) + (1.0 - cfg.b1) * g
        v = cfg.b2 * nu[name].astype(jnp.float32) + (1.0 - cfg.b2) * g * g
        shape = (-1,) + (1,) * (p.ndim - 1)
        m_hat = m / correction1.reshape(shape)
        v_hat = v / correction2.reshape(shape)
        p32 = p.astype(jnp.float32)
        updated = p32 - lr * (m_hat / (jnp.sqrt(v_hat) + cfg.eps) + cfg.weight_decay * p32)
        keep = valid.reshape(shape)
        new_params[name] = _store(
            jnp.where(keep, updated, p32),
            p.dtype,
            cfg,
            rounding_keys,
            i,
            None if counters is None else counters[name],
        )
        new_mu[name] = jnp.where(keep, m, mu[name]).astype(mu[name].dtype)
        new_nu[name] = jnp.where(keep, v, nu[name]).astype(nu[name].dtype)
    return new_params, new_mu, new_nu, jnp.where(valid, count + 1, count)


def is_narrow(dtype: Any) -> bool:
    """Whether a bank stored in `dtype` rounds the float32 updates (bf16, fp16)."""
    return jnp.dtype(dtype).itemsize < jnp.dtype(jnp.float32).itemsize


def _store(
    x: Array, dtype: Any, cfg: MemoryConfig, keys: Array | None, index: int, counters: Array | None
) -> Array:
    """Updated float32 rows in the bank's dtype: rounded stochastically or to nearest."""
    if keys is None or cfg.bank_rounding != "stochastic" or not is_narrow(dtype):
        return x.astype(dtype)
    if counters is None:
        counters = element_counters(x.shape[1:])
    return jax.vmap(
        lambda k, row: stochastic_round(row, dtype, jax.random.fold_in(k, index), counters)
    )(keys, x)
