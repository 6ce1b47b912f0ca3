"""Perplexity of documents with memory routed from the whole document (docs/method.md).

Each document is scored on its own (its first token is the context, every
later token and the closing EOT are predicted), cut to the run's sequence
length, exactly as documents are seen in training. Reported per memory mode:
overall (token-weighted), per level-1 cluster of the document's route, and
per frequency bucket when the documents carry one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from hmem_jax.infer.engine import Engine
from hmem_jax.infer.scoring import continuation_logprobs


def _grouped(keys: np.ndarray, logprob: np.ndarray, tokens: np.ndarray) -> dict[str, float]:
    out = {}
    for key in sorted(set(keys.tolist())):
        rows = keys == key
        out[str(key)] = math.exp(-logprob[rows].sum() / tokens[rows].sum())
    return out


def document_perplexity(
    engine: Engine,
    texts: Sequence[str],
    mode: str,
    buckets: Sequence[int] | None = None,
    batch_size: int = 16,
) -> dict[str, Any]:
    tokenizer = engine.run.tokenizer
    limit = engine.run.cfg.seq_len
    contexts, continuations = [], []
    for text in texts:
        ids = (tokenizer.encode(text) + [tokenizer.eot_id])[:limit]
        if len(ids) < 2:
            ids = [tokenizer.eot_id] + ids
        contexts.append(ids[:1])
        continuations.append(ids[1:])
    memory = engine.memory_for(texts, mode)
    scores = continuation_logprobs(
        engine.model, engine.run.params, contexts, continuations, memory, batch_size
    )
    result: dict[str, Any] = {
        "perplexity": math.exp(-scores.logprob.sum() / scores.tokens.sum()),
        "tokens": int(scores.tokens.sum()),
        "documents": len(texts),
    }
    if engine.has_memory:
        level1 = engine.block_ids(texts)[:, 0]
        result["per_level1_cluster"] = _grouped(level1, scores.logprob, scores.tokens)
    if buckets is not None:
        result["per_bucket"] = _grouped(np.asarray(buckets), scores.logprob, scores.tokens)
    return result


def encyclopedia_buckets(texts: Sequence[str], probes: Sequence[Any]) -> list[int]:
    """Frequency bucket of each document's subject: the probe entity named most often in it
    (-1 for documents that name none, e.g. common-knowledge filler)."""
    names = [(p.entity, p.bucket) for p in probes]
    out = []
    for text in texts:
        best, best_count = -1, 0
        for name, bucket in names:
            count = text.count(name)
            if count > best_count:
                best, best_count = bucket, count
        out.append(best)
    return out
