"""How many documents of a corpus contain each (hashed) feature: the IDF statistics of `hashed_idf`.

Routing groups documents by what they share. Without weighting, the words every
document of a kind repeats ("atomic", "number", "born", "year") outweigh the
one thing that distinguishes a document: the rare names it is about. Inverse
document frequency fixes that, and it is the statistic that makes an entity's
documents, and a prompt that names the entity, land in the same leaf cluster
(BENCHMARKS.md, "The long-tail effect", step 8).

The table has a fixed number of buckets (a feature's bucket is the top bits of
its 64-bit hash), so its size does not grow with the corpus, two tables add up
(counting can be split over workers and summed), and it is saved with the
cluster tree it was fitted with: routing at inference must weigh a prompt's
features exactly as the tree's documents were weighed.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Iterable

import numpy as np

from hmem_jax.errors import TreeError

DEFAULT_BUCKET_BITS = 20  # 1,048,576 counters (8 MB): collisions stay rare below ~10^5 features
_COUNTS_KEY = "document_frequencies"
_DOCUMENTS_KEY = "documents"


@dataclasses.dataclass(frozen=True, eq=False)
class DocumentFrequencies:
    """`counts[b]`: documents holding at least one feature of bucket `b`, out of `documents`."""

    counts: np.ndarray  # int64[2**bucket_bits]
    documents: int

    def __post_init__(self) -> None:
        counts = np.ascontiguousarray(self.counts, dtype=np.int64)
        size = len(counts)
        if counts.ndim != 1 or size < 2 or size & (size - 1):
            raise ValueError(
                f"Document-frequency counts must be a 1-d array whose length is a "
                f"power of two; got shape {counts.shape}."
            )
        if self.documents < 0 or counts.min() < 0 or counts.max() > self.documents:
            raise TreeError(
                "Document-frequency counts must lie in [0, documents]; the table "
                "is corrupt. Re-fit the tree."
            )
        counts.setflags(write=False)
        object.__setattr__(self, "counts", counts)

    @property
    def bucket_bits(self) -> int:
        return int(len(self.counts)).bit_length() - 1

    def buckets(self, hashes: np.ndarray) -> np.ndarray:
        """int64 bucket of each uint64 feature hash (its top `bucket_bits` bits)."""
        return _buckets(hashes, self.bucket_bits)

    @classmethod
    def count(
        cls,
        batches: Iterable[tuple[np.ndarray, np.ndarray, int]],
        bucket_bits: int = DEFAULT_BUCKET_BITS,
    ) -> DocumentFrequencies:
        """The table of a corpus given batch by batch as (`documents`, `hashes`, `count`):
        `count` documents whose features are (`documents[i]`, `hashes[i]`) pairs (document
        indices in [0, count)); a feature counts once per document. The counts accumulate in
        place, so a batch costs its features, not a pass over the whole table."""
        counts = np.zeros(1 << bucket_bits, np.int64)
        total = 0
        for documents, hashes, count in batches:
            buckets = _buckets(hashes, bucket_bits)
            pairs = np.unique(np.asarray(documents, np.int64) * len(counts) + buckets)
            found, times = np.unique(pairs % len(counts), return_counts=True)
            counts[found] += times
            total += int(count)
        return cls(counts, total)

    def merge(self, other: DocumentFrequencies) -> DocumentFrequencies:
        """The table of both corpora together (the tables must have the same size)."""
        if len(other.counts) != len(self.counts):
            raise ValueError(
                f"Cannot merge document-frequency tables of {len(self.counts)} and "
                f"{len(other.counts)} buckets."
            )
        return DocumentFrequencies(self.counts + other.counts, self.documents + other.documents)

    def idf(self, hashes: np.ndarray) -> np.ndarray:
        """float64 inverse document frequency log((1 + N) / (1 + df)) per hash, and 0 for a
        feature found in fewer than two documents.

        A feature in every document weighs 0, and so does one that no two
        documents share (an id, a one-off number, a word the corpus never saw):
        it cannot put two documents in one cluster, and weighted up it would
        pull every document away from all the others.
        """
        df = self.counts[self.buckets(hashes)]
        return np.where(df >= 2, np.log((1.0 + self.documents) / (1.0 + df)), 0.0)

    @functools.cached_property
    def digest(self) -> str:
        """sha256 hex (first 16) of the counts and document count; part of the embedder version."""
        digest = hashlib.sha256(np.int64(self.documents).tobytes())
        digest.update(self.counts.astype("<i8", copy=False).tobytes())
        return digest.hexdigest()[:16]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The table as named arrays (saved beside the tree's centroids)."""
        return {_COUNTS_KEY: self.counts, _DOCUMENTS_KEY: np.asarray([self.documents], np.int64)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> DocumentFrequencies:
        missing = {_COUNTS_KEY, _DOCUMENTS_KEY} - set(arrays)
        if missing:
            raise TreeError(
                f"The embedder state lacks {sorted(missing)}; it was not written by a "
                "'hashed_idf' embedder. Re-fit the tree."
            )
        return cls(np.asarray(arrays[_COUNTS_KEY]), int(np.asarray(arrays[_DOCUMENTS_KEY])[0]))


def _buckets(hashes: np.ndarray, bucket_bits: int) -> np.ndarray:
    return (np.asarray(hashes, np.uint64) >> np.uint64(64 - bucket_bits)).astype(np.int64)
