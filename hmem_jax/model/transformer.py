"""The anchor: an OpenLM-style pre-norm decoder (docs/method.md).

    tokens[B, T] ─► embed ─► L × Block ─► final RMSNorm ─► logits[B, T, V]
    Block: x + Attention(RMSNorm(x)) ; x + SwiGLU(RMSNorm(x))

The blocks are one `nn.scan` over stacked layer parameters (leading axis
`layers`), so compile time does not grow with depth. Memory (docs/design.md
decision 1) is an input: `memory` is a pytree whose leaves have a leading
`layers` axis and is scanned alongside the blocks; the anchor never knows
where the blocks came from. With `memory=None` the model is the plain anchor.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from hmem_jax.config import ModelConfig
from hmem_jax.model.cache import KVCache, advance, attention_mask
from hmem_jax.model.layers import (
    Attention,
    RMSNorm,
    SwiGLU,
    dense,
    dtype_of,
    truncated_normal,
)

Array = jax.Array

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Block(nn.Module):
    """One pre-norm transformer block; `memory` is this layer's slice (or None).

    The scan carry is the residual stream x, or, when decoding with a KV cache,
    (x, layer index, the whole cache), so the cache is updated in place.
    `segments_or_mask`: segment_ids[B, T], or with a cache its dense mask (see `Attention`).
    """

    cfg: ModelConfig
    lora_scale: float = 1.0

    @nn.compact
    def __call__(
        self,
        carry: Any,
        segments_or_mask: Array,
        positions: Array,
        memory: Any,
        cache_index: Array | None = None,
    ) -> tuple[Any, None]:
        x, layer, cache = carry if isinstance(carry, tuple) else (carry, None, None)
        attn = Attention(self.cfg, self.lora_scale, name="attn")
        mlp = SwiGLU(self.cfg, self.lora_scale, name="mlp")
        attended, cache = attn(
            RMSNorm(self.cfg, "embed", name="attn_norm")(x),
            segments_or_mask,
            positions,
            memory,
            cache,
            cache_index,
            layer,
        )
        x = x + attended
        x = x + mlp(RMSNorm(self.cfg, "embed", name="mlp_norm")(x), memory)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        if layer is None:
            return x, None
        return (x, layer + 1, cache), None


class Transformer(nn.Module):
    """Decoder-only LM; `__call__` returns float32 logits[B, T, V].

    `lora_scale` multiplies LoRA memories' B·A (α / R for the fetched rank R).
    """

    cfg: ModelConfig
    lora_scale: float = 1.0

    def setup(self) -> None:
        cfg = self.cfg
        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
        self.blocks = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
            length=cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, self.lora_scale, name="blocks")
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(truncated_normal(cfg.init_std), ("vocab", "embed")),
            (cfg.vocab_size, cfg.d_model),
            dtype_of(cfg.param_dtype),
        )
        self.final_norm = RMSNorm(cfg, "embed")
        if not cfg.tie_embeddings:
            self.lm_head = self.param(
                "lm_head",
                nn.with_logical_partitioning(
                    truncated_normal(1.0 / math.sqrt(cfg.d_model)), ("embed", "vocab")
                ),
                (cfg.d_model, cfg.vocab_size),
                dtype_of(cfg.param_dtype),
            )

    def embed(self, tokens: Array) -> Array:
        """Token embeddings[B, T, d] in the compute dtype."""
        # The lookup reads the table whole (as FSDP gathers any weight before use);
        # gathering rows from a table sharded over `embed` into a batch-sharded
        # output would otherwise make the partitioner replicate via a slow path.
        table = nn.with_logical_constraint(
            jnp.asarray(self.embedding, dtype_of(self.cfg.dtype)), (None, None)
        )
        x = jnp.take(table, tokens, axis=0)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))

    def hidden_states(
        self, tokens: Array, segment_ids: Array, positions: Array, memory: Any = None
    ) -> Array:
        """Final-normed hidden states[B, T, d] in the compute dtype."""
        x, _ = self.blocks(self.embed(tokens), segment_ids, positions, memory, None)
        return self.final_norm(x)

    def extend(
        self,
        tokens: Array,
        segment_ids: Array,
        positions: Array,
        cache: KVCache,
        memory: Any = None,
    ) -> tuple[Array, KVCache]:
        """Run tokens[B, T] at cache slots [cache.index, cache.index + T): -> (logits, cache).

        The KV-cache path of decoding (see hmem_jax/model/cache.py): the same
        layers and parameters as `__call__`, attending to every filled slot of
        the same segment up to each query's own slot.
        """
        mask = attention_mask(cache, segment_ids)
        carry = (self.embed(tokens), jnp.zeros((), jnp.int32), cache.layers)
        (x, _, layers), _ = self.blocks(carry, mask, positions, memory, cache.index)
        logits = self.logits(self.final_norm(x))
        return logits, advance(cache, layers, segment_ids)

    def logits(self, hidden: Array) -> Array:
        """float32 logits[B, T, V] from hidden states."""
        if self.cfg.tie_embeddings:
            head = jnp.asarray(self.embedding, dtype_of(self.cfg.dtype)).T
        else:
            head = jnp.asarray(self.lm_head, dtype_of(self.cfg.dtype))
        out = dense(hidden, head).astype(jnp.float32)
        return nn.with_logical_constraint(out, ("batch", "length", "vocab"))

    def __call__(
        self, tokens: Array, segment_ids: Array, positions: Array, memory: Any = None
    ) -> Array:
        """tokens, segment_ids, positions: int32[B, T]; memory: per-layer pytree or None."""
        return self.logits(self.hidden_states(tokens, segment_ids, positions, memory))


def init_abstract(cfg: ModelConfig, batch: int = 1, length: int = 8) -> Any:
    """Parameter shapes (boxed with logical axes) without allocating anything."""
    model = Transformer(cfg)
    ids = jnp.zeros((batch, length), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), ids, ids + 1, ids))["params"]


def count_params(params: Any) -> int:
    """Total number of scalars in a (possibly abstract, possibly boxed) parameter tree."""
    leaves = jax.tree.leaves(nn.meta.unbox(params))
    return int(sum(math.prod(leaf.shape) for leaf in leaves))
