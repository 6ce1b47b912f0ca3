"""Log-likelihood scoring: the number behind perplexity and multiple-choice accuracy.

`continuation_logprobs` scores continuation tokens given their contexts, each
row with its own memory: the sum of log p(token | everything before it), the
token count, and whether every continuation token is the greedy choice.
Rows are right-padded into batches of a fixed size and a width rounded up to
a multiple of `width_multiple`, so a task compiles a handful of programs, not
one per length.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hmem_jax.infer.retrieval import select_rows
from hmem_jax.model.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class Scores:
    logprob: np.ndarray  # float64[N]: Σ log p over the continuation
    tokens: np.ndarray  # int64[N]: continuation length in tokens
    greedy: np.ndarray  # bool[N]: every continuation token is the argmax


@functools.partial(jax.jit, static_argnums=(0,))
def _token_logprobs(
    model: Transformer, params: Any, tokens: jax.Array, segment_ids: jax.Array, memory: Any
) -> tuple[jax.Array, jax.Array]:
    """(log p of tokens[:, 1:], is-argmax of tokens[:, 1:]), both [B, T-1]."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits: jax.Array = model.apply(  # type: ignore[assignment]
        {"params": params}, tokens, segment_ids, positions, memory
    )
    logits = logits[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    target = tokens[:, 1:]
    picked = jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == target


def continuation_logprobs(
    model: Transformer,
    params: Any,
    contexts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    memory: Any = None,
    batch_size: int = 16,
    width_multiple: int = 32,
    max_length: int | None = None,
) -> Scores:
    """Scores of `continuations[i]` after `contexts[i]` (each context needs >= 1 token).

    With `max_length`, contexts are cut from the left so context + continuation fits.
    """
    rows = len(contexts)
    if rows != len(continuations):
        raise ValueError(f"{rows} contexts but {len(continuations)} continuations.")
    logprob, count, greedy = np.zeros(rows), np.zeros(rows, np.int64), np.zeros(rows, bool)
    pairs = []
    for context, continuation in zip(contexts, continuations):
        context, continuation = list(context), list(continuation)
        if not context or not continuation:
            raise ValueError("Every context and continuation needs at least one token.")
        if max_length is not None:
            context = context[-max(1, max_length - len(continuation)) :]
        pairs.append((context, continuation))
    for start in range(0, rows, batch_size):
        chunk = pairs[start : start + batch_size]
        longest = max(len(c) + len(x) for c, x in chunk)
        width = -(-longest // width_multiple) * width_multiple
        tokens = np.zeros((batch_size, width), np.int32)
        segments = np.zeros_like(tokens)
        for row, (context, continuation) in enumerate(chunk):
            ids = context + continuation
            tokens[row, : len(ids)], segments[row, : len(ids)] = ids, 1
        index = np.minimum(np.arange(start, start + batch_size), rows - 1)  # pad with copies
        picked, is_max = _token_logprobs(
            model, params, tokens, segments, select_rows(memory, index)
        )
        picked, is_max = np.asarray(picked, np.float64), np.asarray(is_max)
        for row, (context, continuation) in enumerate(chunk):
            span = slice(len(context) - 1, len(context) + len(continuation) - 1)
            logprob[start + row] = picked[row, span].sum()
            count[start + row] = len(continuation)
            greedy[start + row] = bool(is_max[row, span].all())
    return Scores(logprob=logprob, tokens=count, greedy=greedy)
