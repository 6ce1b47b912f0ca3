"""Sparse (lazy) AdamW for memory blocks (DESIGN.md decision 4).

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
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from hmem_jax.config import MemoryConfig

Array = jax.Array


def sparse_adamw(params: Mapping[str, Array], grads: Mapping[str, Array],
                 mu: Mapping[str, Array], nu: Mapping[str, Array], count: Array, valid: Array,
                 lr: Array, cfg: MemoryConfig) -> tuple[dict, dict, dict, Array]:
    """One lazy AdamW step on gathered rows.

    params/grads/mu/nu[name]: [U, ...]; count: int32[U] updates received so far;
    valid: bool[U] rows to update (padding rows are returned unchanged).
    Returns (params, mu, nu, count), the rows to write back.
    """
    t = (count + 1).astype(jnp.float32)
    correction1 = 1.0 - cfg.b1 ** t
    correction2 = 1.0 - cfg.b2 ** t
    new_params, new_mu, new_nu = {}, {}, {}
    for name, p in params.items():
        g = grads[name].astype(jnp.float32)
        m = cfg.b1 * mu[name].astype(jnp.float32) + (1.0 - cfg.b1) * g
        v = cfg.b2 * nu[name].astype(jnp.float32) + (1.0 - cfg.b2) * g * g
        shape = (-1,) + (1,) * (p.ndim - 1)
        m_hat = m / correction1.reshape(shape)
        v_hat = v / correction2.reshape(shape)
        p32 = p.astype(jnp.float32)
        updated = p32 - lr * (m_hat / (jnp.sqrt(v_hat) + cfg.eps) + cfg.weight_decay * p32)
        keep = valid.reshape(shape)
        new_params[name] = jnp.where(keep, updated, p32).astype(p.dtype)
        new_mu[name] = jnp.where(keep, m, mu[name]).astype(mu[name].dtype)
        new_nu[name] = jnp.where(keep, v, nu[name]).astype(nu[name].dtype)
    return new_params, new_mu, new_nu, jnp.where(valid, count + 1, count)
