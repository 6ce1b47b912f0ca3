"""The retrieval-augmented baseline (the paper's Table 3): prepend the nearest training document.

Documents are embedded with the run's tree embedder (the same space the
memory is routed in); a query's nearest document is the one of largest
cosine similarity (embeddings are L2-normalised). It is what a RAG system
with this retriever would give the anchor instead of memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class NearestDocument:
    """query texts -> the text of their nearest document."""

    def __init__(self, embedder: Any, documents: Sequence[str], max_chars: int = 4000) -> None:
        if not documents:
            raise ValueError("The retrieval baseline needs at least one document.")
        self.embedder = embedder
        self.documents = [d[:max_chars] for d in documents]
        self.vectors = np.asarray(embedder.embed(list(documents)), np.float32)

    def nearest_index(self, queries: Sequence[str]) -> np.ndarray:
        queries_vectors = np.asarray(self.embedder.embed(list(queries)), np.float32)
        return np.argmax(queries_vectors @ self.vectors.T, axis=1)

    def __call__(self, queries: Sequence[str]) -> list[str]:
        return [self.documents[i] for i in self.nearest_index(queries)]


def training_documents(cfg: Any, limit: int | None = None) -> list[str]:
    """Texts of the run's training corpus (DataConfig), at most `limit`."""
    from hmem_jax.data.sources import read_documents

    texts = []
    for document in read_documents(cfg.data):
        texts.append(document.text)
        if limit is not None and len(texts) >= limit:
            break
    return texts
