"""The device-resident bank tier: every level's blocks as (sharded) arrays on the mesh.

For banks that fit in aggregate accelerator memory. A level is a `LevelBank`:
matrices `[clusters, layers, ...]` with their AdamW moments and per-block
update counts. In training every block is split over the devices
(`bank.exchange`: each device holds a slice of every block) and each batch
shard fetches its own blocks; `fetch` and `commit` here are the plain
gathers and scatters of rows, used on the devices' slices in the step
(`bank/exchange.py`) and by inference on a bank of any layout.
Block ids equal to the level's cluster count are padding (see
hmem_jax/data/loader.py): gathers clamp them, scatters drop them.

Initialisation is per block, from (seed, level, block id) only, so a bank
tier that materialises blocks lazily (the streamed tier) creates exactly the
same values, and both tiers train identically.
"""

from __future__ import annotations

import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from hmem_jax.bank.geometry import BankGeometry, MatrixSpec

Array = jax.Array
GENERIC = "generic"


@flax.struct.dataclass
class LevelBank:
    params: dict[str, Array]  # name -> [clusters, layers, ...]
    mu: dict[str, Array]
    nu: dict[str, Array]
    count: Array  # int32[clusters]: updates each block has received


def level_key(level: int | str) -> str:
    return GENERIC if level == GENERIC else f"l{level}"


def _init_matrix(key: Array, spec: MatrixSpec, shape: tuple[int, ...], dtype: Any) -> Array:
    if spec.init == "zeros":
        return jnp.zeros(shape, dtype)
    if spec.init == "kaiming_uniform":
        # torch's LoRA default, kaiming_uniform(a=√5): bound = 1/√fan_in.
        bound = 1.0 / math.sqrt(spec.fan_in)
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
    std = 1.0 / math.sqrt(spec.fan_in)
    # Truncated to ±2σ and rescaled so the standard deviation is `std`.
    return (
        jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)
        * (std / 0.87962566103423978)
    ).astype(dtype)


def init_block(
    geometry: BankGeometry, rank: int, seed: int, level: int | str, block_id: Array, dtype: Any
) -> dict[str, Array]:
    """One block's matrices [layers, ...] from (seed, level, block id) alone."""
    level_index = 0 if level == GENERIC else int(level)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), level_index), block_id)
    out = {}
    for i, (name, spec) in enumerate(sorted(geometry.matrices.items())):
        shape = (len(geometry.layers),) + spec.at_rank(rank)
        out[name] = _init_matrix(jax.random.fold_in(key, i), spec, shape, dtype)
    return out


def init_level(
    geometry: BankGeometry, level: int | str, seed: int, dtype: Any, moment_dtype: Any
) -> LevelBank:
    """All blocks of a level (or the one generic block), initialised and with zero moments."""
    if level == GENERIC:
        clusters, rank = 1, geometry.fetched_rank
    else:
        assert isinstance(level, int), level
        clusters, rank = geometry.clusters(level), geometry.level_sizes[level - 1]
    ids = jnp.arange(clusters)
    params = jax.vmap(lambda i: init_block(geometry, rank, seed, level, i, dtype))(ids)
    zeros = {n: jnp.zeros(p.shape, moment_dtype) for n, p in params.items()}
    return LevelBank(
        params=params, mu=zeros, nu=dict(zeros), count=jnp.zeros((clusters,), jnp.int32)
    )


def init_bank(
    geometry: BankGeometry, seed: int, dtype: Any, moment_dtype: Any, with_generic: bool
) -> dict[str, LevelBank]:
    """The whole device bank: one LevelBank per level with memory (+ the generic block)."""
    bank = {
        level_key(l): init_level(geometry, l, seed, dtype, moment_dtype)
        for l in geometry.active_levels
    }
    if with_generic:
        bank[GENERIC] = init_level(geometry, GENERIC, seed, dtype, moment_dtype)
    return bank


def fetch(level: LevelBank, ids: Array) -> LevelBank:
    """Rows `ids` (int32[U]; padding clamps to a real row) of a level: params, moments, counts."""
    take = lambda x: jnp.take(x, ids, axis=0, mode="clip")  # noqa: E731
    return jax.tree.map(take, level)


def commit(level: LevelBank, ids: Array, rows: LevelBank) -> LevelBank:
    """Write `rows` back at `ids`; padding ids (>= clusters) are dropped."""
    return jax.tree.map(
        lambda full, new: full.at[ids].set(new.astype(full.dtype), mode="drop"), level, rows
    )
