"""Tokenizing document chunks in worker processes, a bounded window ahead of the consumer.

Tokenization is the CPU-bound part of preparation; the pool keeps
`2 * workers` chunks in flight and yields them in order, so packing sees the
corpus order whatever the number of workers.
"""

from __future__ import annotations

import collections
import multiprocessing
from collections.abc import Iterable, Iterator

import numpy as np

from hmem_jax.data import tokenizer as tokenizer_lib
from hmem_jax.data.document import Document

_worker_tokenizer: tokenizer_lib.Tokenizer | None = None


def _init_worker(kind: str, data: bytes) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer_lib.tokenizer_from_bytes(kind, data)


def _tokenize_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    assert _worker_tokenizer is not None
    return _flatten(_worker_tokenizer.encode_batch(texts))


def _flatten(encoded: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(all ids int32, per-document lengths): cheaper to send between processes than lists."""
    lengths = np.fromiter((len(ids) for ids in encoded), dtype=np.int64, count=len(encoded))
    flat = np.fromiter(
        (i for ids in encoded for i in ids), dtype=np.int32, count=int(lengths.sum())
    )
    return flat, lengths


class TokenizerPool:
    """Tokenizes chunks in worker processes, a bounded window ahead of the consumer."""

    def __init__(self, tokenizer: tokenizer_lib.Tokenizer, workers: int) -> None:
        self.tokenizer = tokenizer
        self.pool = None
        if workers > 0:
            # spawn, not fork: the parent may hold JAX/torch threads, which fork would copy broken.
            context = multiprocessing.get_context("spawn")
            self.pool = context.Pool(
                workers, initializer=_init_worker, initargs=(tokenizer.kind, tokenizer.data)
            )
        self.window = max(2, 2 * workers)

    def map(
        self, chunks: Iterable[list[Document]]
    ) -> Iterator[tuple[list[Document], np.ndarray, np.ndarray]]:
        if self.pool is None:
            for chunk in chunks:
                yield (chunk, *_flatten(self.tokenizer.encode_batch([d.text for d in chunk])))
            return
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(
                (chunk, self.pool.apply_async(_tokenize_in_worker, ([d.text for d in chunk],)))
            )
            if len(pending) >= self.window:
                chunk, result = pending.popleft()
                yield (chunk, *result.get())
        while pending:
            chunk, result = pending.popleft()
            yield (chunk, *result.get())

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
