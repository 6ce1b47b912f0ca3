"""Building blocks of the anchor: gain-only RMSNorm, rotary embeddings, attention, SwiGLU.

Every parameter carries logical axis names (see `MeshConfig.rules`); the
mesh placement is decided by the rules table, never here. Parameters are
stored in `param_dtype` and cast to the compute `dtype` at use; norms and
softmax run in float32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hmem_jax.config import ModelConfig
from hmem_jax.model.attention import attend, cached_attention
from hmem_jax.model.memory import Memory, add_lora, ffn_memory, kv_memory_attention
from hmem_jax.model.platform import compute_dtype

Array = jax.Array


def dtype_of(name: str) -> jnp.dtype:
    """A dtype by name; the compute dtype 'auto' by platform (`platform.compute_dtype`)."""
    return compute_dtype(name)


def truncated_normal(std: float) -> nn.initializers.Initializer:
    """Normal truncated to ±2σ, rescaled so its standard deviation is `std`."""
    # 0.8796 is the standard deviation of a unit normal truncated to [-2, 2].
    return nn.initializers.truncated_normal(stddev=std / 0.87962566103423978)


def param(
    module: nn.Module,
    name: str,
    init: nn.initializers.Initializer,
    shape: tuple[int, ...],
    axes: tuple[str | None, ...],
    cfg: ModelConfig,
) -> Array:
    """A parameter with logical axis names, returned in the compute dtype."""
    value = module.param(
        name, nn.with_logical_partitioning(init, axes), shape, dtype_of(cfg.param_dtype)
    )
    return jnp.asarray(value, dtype_of(cfg.dtype))


def dense(x: Array, w: Array) -> Array:
    """x[..., d] @ w[d, f] as one 2-D matmul.

    XLA:CPU runs the backward of a 3-D activation times a 2-D weight (which
    contracts over batch and length at once) about twice as slow as the same
    product on the flattened [B*T, d] activation; accelerators do not care.
    """
    flat = x.reshape(-1, x.shape[-1]) @ w
    return flat.reshape(x.shape[:-1] + (w.shape[-1],))


class RMSNorm(nn.Module):
    """Gain-only RMS normalisation over the last axis, computed in float32."""

    cfg: ModelConfig
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
            (x.shape[-1],),
            dtype_of(self.cfg.param_dtype),
        )
        x32 = x.astype(jnp.float32)
        mean_square = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        normed = x32 * jax.lax.rsqrt(mean_square + self.cfg.norm_eps)
        return (normed * scale.astype(jnp.float32)).astype(x.dtype)  # type: ignore[attr-defined]


def llama3_inv_freq(
    inv_freq: np.ndarray,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max: float,
) -> np.ndarray:
    """Llama 3's rescaled rotary frequencies: long wavelengths slowed by `factor`, short ones
    kept, a smooth blend in between (what `transformers` computes for rope_type 'llama3')."""
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > original_max / low_freq_factor, inv_freq / factor, inv_freq)
    smooth = (original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original_max / high_freq_factor) & (
        wavelen <= original_max / low_freq_factor
    )
    return np.where(medium, blended, scaled).astype(np.float32)


def rotary(x: Array, positions: Array, base: float, llama3: tuple[float, ...] = ()) -> Array:
    """Rotary position embedding, rotate-half layout (as Llama/NeoX in `transformers`).

    x[B, T, N, H], positions[B, T] -> [B, T, N, H]. Positions restart at 0 in
    each packed document, so a document sees the same encoding wherever it sits.
    `llama3`: optional (factor, low, high, original_max) frequency rescaling.
    """
    half = x.shape[-1] // 2
    if llama3:
        plain = 1.0 / (base ** (np.arange(half, dtype=np.float32) * 2.0 / x.shape[-1]))
        inv_freq = jnp.asarray(llama3_inv_freq(plain.astype(np.float32), *llama3))
    else:
        inv_freq = 1.0 / (base ** (jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1]))
    angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [B, T, 1, H/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


class Attention(nn.Module):
    """Multi-head (optionally grouped-query) attention with qk-norm and RoPE, no biases.

    `memory` (this layer's, per sequence) may add LoRA to q/k/v/o and KV-memory slots.
    Without a cache (training) `segments_or_mask` is segment_ids[B, T]: queries attend
    causally within their document, computed as `cfg.attention` says
    (hmem_jax/model/attention.py), and the second output is None.
    With a `cache` (all layers' {"k", "v"}: [layers, B, S, kv_heads, head_dim],
    see hmem_jax/model/cache.py) the new keys/values are written at
    [`layer`, :, `cache_index`] and the queries attend over this layer's filled slots,
    a block at a time straight out of the whole cache (`attention.cached_attention`;
    `segments_or_mask` is then the dense mask[B, 1, T, S]); the updated cache is
    returned. The whole cache travels in the scan's carry, so each step updates it in
    place instead of copying every layer's slice out and back.
    """

    cfg: ModelConfig
    lora_scale: float = 1.0

    @nn.compact
    def __call__(
        self,
        x: Array,
        segments_or_mask: Array,
        positions: Array,
        memory: Memory | None = None,
        cache: Mapping[str, Array] | None = None,
        cache_index: Array | None = None,
        layer: Array | None = None,
    ) -> tuple[Array, dict[str, Array] | None]:
        cfg = self.cfg
        batch, length, d = x.shape
        q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        in_init = truncated_normal(1.0 / math.sqrt(d))
        out_init = truncated_normal(1.0 / math.sqrt(q_width * 2 * cfg.num_layers))
        wq = param(self, "wq", in_init, (d, q_width), ("embed", "q_width"), cfg)
        wk = param(self, "wk", in_init, (d, kv_width), ("embed", "kv_width"), cfg)
        wv = param(self, "wv", in_init, (d, kv_width), ("embed", "kv_width"), cfg)
        wo = param(self, "wo", out_init, (q_width, d), ("q_width", "embed"), cfg)

        scale = self.lora_scale
        q = add_lora(dense(x, wq), x, memory, "q", scale)
        k = add_lora(dense(x, wk), x, memory, "k", scale)
        v = add_lora(dense(x, wv), x, memory, "v", scale)
        if cfg.qkv_bias:  # Qwen2-style imported anchors
            zeros = nn.initializers.zeros
            q = q + param(self, "bq", zeros, (q_width,), ("q_width",), cfg)
            k = k + param(self, "bk", zeros, (kv_width,), ("kv_width",), cfg)
            v = v + param(self, "bv", zeros, (kv_width,), ("kv_width",), cfg)
        if cfg.qk_norm == "full":
            q = RMSNorm(cfg, "q_width", name="q_norm")(q)
            k = RMSNorm(cfg, "kv_width", name="k_norm")(k)
        q = q.reshape(batch, length, cfg.num_heads, cfg.head_dim)
        k = k.reshape(batch, length, cfg.kv_heads, cfg.head_dim)
        v = v.reshape(batch, length, cfg.kv_heads, cfg.head_dim)
        if cfg.qk_norm == "per_head":
            q = RMSNorm(cfg, "head_dim", name="q_norm")(q)
            k = RMSNorm(cfg, "head_dim", name="k_norm")(k)
        q_unrotated = q
        q = rotary(q, positions, cfg.rope_base, cfg.rope_llama3)
        k = rotary(k, positions, cfg.rope_base, cfg.rope_llama3)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        new_cache = None
        if cache is None:
            out = attend(
                q,
                k,
                v,
                segments_or_mask,
                implementation=cfg.attention,
                block=cfg.attention_block,
                max_documents=cfg.attention_max_documents,
            )
        else:
            assert layer is not None and cache_index is not None, "a cache needs both"
            zero = jnp.zeros((), jnp.int32)
            start = (layer, zero, cache_index, zero, zero)
            new_cache = {
                name: jax.lax.dynamic_update_slice(
                    cache[name], value[None].astype(cache[name].dtype), start
                )
                for name, value in (("k", k), ("v", v))
            }
            out = cached_attention(
                q,
                new_cache["k"],
                new_cache["v"],
                layer,
                segments_or_mask,
                cache_index + length,
            )  # [B, T, N, H]
        if memory and "keys" in memory:
            out = out + kv_memory_attention(q_unrotated, memory)
        out = out.reshape(batch, length, q_width)
        return add_lora(dense(out, wo), out, memory, "o", scale), new_cache


class SwiGLU(nn.Module):
    """down(silu(x·gate) * (x·up)), no biases; plus FFN-memory units or LoRA from `memory`."""

    cfg: ModelConfig
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, x: Array, memory: Memory | None = None) -> Array:
        cfg = self.cfg
        d = x.shape[-1]
        in_init = truncated_normal(1.0 / math.sqrt(d))
        out_init = truncated_normal(1.0 / math.sqrt(cfg.d_ff * 2 * cfg.num_layers))
        w_gate = param(self, "w_gate", in_init, (d, cfg.d_ff), ("embed", "mlp"), cfg)
        w_up = param(self, "w_up", in_init, (d, cfg.d_ff), ("embed", "mlp"), cfg)
        w_down = param(self, "w_down", out_init, (cfg.d_ff, d), ("mlp", "embed"), cfg)
        scale = self.lora_scale
        gate = add_lora(dense(x, w_gate), x, memory, "gate", scale)
        up = add_lora(dense(x, w_up), x, memory, "up", scale)
        hidden = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        out = add_lora(dense(hidden, w_down), hidden, memory, "down", scale)
        if memory and ("down" in memory or "grouped" in memory):
            out = out + ffn_memory(x, memory)
        return out
