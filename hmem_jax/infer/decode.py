"""Batched autoregressive decoding with a KV cache: greedy, temperature, top-k, top-p.

Prompts of different lengths are left-padded into one batch (padding has
segment id 0 and sees only padding), so every prompt ends at the same slot and
each new token is written at the same cache slot for all rows; RoPE positions
count from each prompt's own first token. Each row has its own memory (the
`memory` pytree is per sequence, [layers, B, ...]), so one batch may mix
prompts routed to different cluster paths. One compiled prefill per padded
prompt length and one compiled step per (batch, cache length).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hmem_jax.data.batch import MODEL_INPUTS, POSITIONS, SEGMENT_IDS, TOKENS
from hmem_jax.errors import ConfigError
from hmem_jax.model.cache import KVCache, init_cache
from hmem_jax.model.transformer import Transformer

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0 = greedy (top_k / top_p are then unused)."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1 = no nucleus cut
    seed: int = 0
    stop_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"Sampling.max_new_tokens = {self.max_new_tokens} must be >= 1.")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(
                f"Sampling needs temperature >= 0, top_k >= 0 and top_p in (0, 1]; "
                f"got {self.temperature}, {self.top_k}, {self.top_p}."
            )


def sample_tokens(logits: Array, key: Array, temperature: float, top_k: int, top_p: float) -> Array:
    """int32[B] from logits[B, V]: argmax at temperature 0, else a draw from the cut
    distribution."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(ordered, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        keep = jnp.sum(cumulative - jax.nn.softmax(ordered, axis=-1) < top_p, axis=-1)
        threshold = jnp.take_along_axis(ordered, keep[:, None] - 1, axis=-1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, width_multiple: int = 1
) -> dict[str, np.ndarray]:
    """tokens / segment_ids / positions int32[B, P], prompts right-aligned; `lengths` int32[B].

    P is the longest prompt rounded up to `width_multiple` (fewer distinct shapes to compile).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError(
            "Every prompt needs at least one token (encode it with a BOS or EOT "
            "token if it is empty)."
        )
    width = -(-max(len(p) for p in prompts) // width_multiple) * width_multiple
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    segments = np.zeros_like(tokens)
    positions = np.zeros_like(tokens)
    for row, prompt in enumerate(prompts):
        start = width - len(prompt)
        tokens[row, start:] = prompt
        segments[row, start:] = 1
        positions[row, start:] = np.arange(len(prompt))
    lengths = np.array([len(p) for p in prompts], np.int32)
    return {TOKENS: tokens, SEGMENT_IDS: segments, POSITIONS: positions, "lengths": lengths}


class Decoder:
    """A jitted prefill and a jitted decode loop (`lax.while_loop`, no per-token host round
    trip)."""

    def __init__(self, model: Transformer, params: Any) -> None:
        self.model, self.params = model, params
        self._prefill = jax.jit(self._extend)
        self._loop = jax.jit(self._decode_loop, static_argnums=(5,))

    def _extend(
        self,
        params: Any,
        tokens: Array,
        segment_ids: Array,
        positions: Array,
        cache: KVCache,
        memory: Any,
    ) -> tuple[Array, KVCache]:
        return self.model.apply(  # type: ignore[return-value]
            {"params": params},
            tokens,
            segment_ids,
            positions,
            cache,
            memory,
            method=Transformer.extend,
        )

    def _decode_loop(
        self,
        params: Any,
        cache: KVCache,
        last_logits: Array,
        lengths: Array,
        key: Array,
        sampling: Sampling,
        memory: Any,
    ) -> tuple[Array, Array]:
        """(int32[B, max_new_tokens] sampled tokens, steps run); stops early once every row hit
        a stop id."""
        batch = last_logits.shape[0]
        stops = jnp.asarray(sampling.stop_ids or (-1,), jnp.int32)

        def step(carry: tuple) -> tuple:
            index, cache, logits, out, done = carry
            token = sample_tokens(
                logits,
                jax.random.fold_in(key, index),
                sampling.temperature,
                sampling.top_k,
                sampling.top_p,
            )
            out = out.at[:, index].set(token)
            done = done | jnp.any(token[:, None] == stops[None, :], axis=-1)
            positions = (lengths + index)[:, None]
            logits, cache = self._extend(
                params, token[:, None], jnp.ones_like(positions), positions, cache, memory
            )
            return index + 1, cache, logits[:, -1], out, done

        def keep_going(carry: tuple) -> Array:
            index, _, _, _, done = carry
            return (index < sampling.max_new_tokens) & ~jnp.all(done)

        out = jnp.zeros((batch, sampling.max_new_tokens), jnp.int32)
        init = (jnp.zeros((), jnp.int32), cache, last_logits, out, jnp.zeros((batch,), bool))
        index, _, _, out, _ = jax.lax.while_loop(keep_going, step, init)
        return out, index

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: Sampling,
        memory: Any = None,
        pad_id: int = 0,
        width_multiple: int = 16,
    ) -> list[list[int]]:
        """New token ids per prompt (up to max_new_tokens; cut after the first stop id)."""
        batch = left_pad(prompts, pad_id, width_multiple)
        width = batch[TOKENS].shape[1]
        cache = init_cache(self.model.cfg, len(prompts), width + sampling.max_new_tokens)
        logits, cache = self._prefill(
            self.params, *(batch[key] for key in MODEL_INPUTS), cache, memory
        )
        out, steps = self._loop(
            self.params,
            cache,
            logits[:, -1],
            jnp.asarray(batch["lengths"]),
            jax.random.key(sampling.seed),
            sampling,
            memory,
        )
        generated = np.asarray(out)[:, : int(steps)]
        return [_cut(row.tolist(), set(sampling.stop_ids)) for row in generated]


def _cut(ids: list[int], stops: set[int]) -> list[int]:
    for index, token in enumerate(ids):
        if token in stops:
            return ids[:index]
    return ids
