"""The key/value cache of incremental decoding.

Decoding one token at a time recomputes nothing: each layer's rotated keys
and values of every earlier slot are kept in `layers["k"/"v"]`
[layers, B, S, kv_heads, head_dim]; a call of `Transformer.extend` writes the
new tokens at slots [index, index + T) and attends over the filled slots.
`segment_ids[B, S]` records which document each slot belongs to (0 = empty or
left padding), so batched prompts of different lengths are left-padded and a
query sees only its own sequence's slots: attention is exactly what the full
forward pass with a document mask computes.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from hmem_jax.config import ModelConfig
from hmem_jax.model.platform import compute_dtype

Array = jax.Array


@flax.struct.dataclass
class KVCache:
    layers: dict[str, Array]  # "k", "v": [layers, B, S, kv_heads, head_dim]
    segment_ids: Array  # int32[B, S]: 0 = empty slot or padding
    index: Array  # int32 scalar: the next slot to write

    @property
    def max_length(self) -> int:
        return int(self.segment_ids.shape[1])


def init_cache(cfg: ModelConfig, batch: int, max_length: int) -> KVCache:
    """An empty cache for `batch` sequences of at most `max_length` tokens (prompt + output)."""
    shape = (cfg.num_layers, batch, max_length, cfg.kv_heads, cfg.head_dim)
    dtype = compute_dtype(cfg.dtype)
    return KVCache(
        layers={"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)},
        segment_ids=jnp.zeros((batch, max_length), jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )


def _with_new_segments(cache: KVCache, segment_ids: Array) -> Array:
    return jax.lax.dynamic_update_slice_in_dim(
        cache.segment_ids, segment_ids.astype(jnp.int32), cache.index, axis=1
    )


def attention_mask(cache: KVCache, segment_ids: Array) -> Array:
    """mask[B, 1, T, S]: new token t (slot index + t) may attend slot s <= its own, same segment."""
    length, slots = segment_ids.shape[1], cache.max_length
    query_slots = cache.index + jnp.arange(length)
    causal = jnp.arange(slots)[None, :] <= query_slots[:, None]  # [T, S]
    keys = _with_new_segments(cache, segment_ids)
    same = segment_ids[:, :, None] == keys[:, None, :]
    return (causal[None] & same)[:, None]


def advance(cache: KVCache, layers: dict[str, Array], segment_ids: Array) -> KVCache:
    """The cache after `segment_ids.shape[1]` tokens were written with `layers`' keys/values."""
    return KVCache(
        layers=layers,
        segment_ids=_with_new_segments(cache, segment_ids),
        index=cache.index + segment_ids.shape[1],
    )
