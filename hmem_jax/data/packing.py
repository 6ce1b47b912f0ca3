"""Packing documents into fixed-length sequences per leaf cluster, and writing them as shards.

Documents of the same leaf cluster are packed together, so every sequence
belongs to exactly one cluster path and trains with that path's memory blocks
(docs/method.md); without a tree (anchor-only pretraining) all documents share
one stream. Each document is followed by EOT. Within a sequence, segment ids
number the documents 1, 2, 3, ...; 0 marks padding. A document longer than
`seq_len` is the only one cut: its pieces are new segments whose positions
restart at 0 (the anchor uses rotary embeddings, which see only relative
positions, so restarting loses nothing and lets the loader derive positions
from segment ids alone). `LeafPacker` says why nothing else is cut.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from hmem_jax.data.prepared import RECORD_LEAVES_FILE, SHARD_PATTERN

_SHARD_TARGET_BYTES = 256 << 20


@dataclasses.dataclass(eq=False)  # compared by identity: a leaf's open list removes by it
class _OpenSequence:
    tokens: np.ndarray
    segment_ids: np.ndarray
    fill: int = 0
    segments: int = 0


class LeafPacker:
    """Packs documents into `seq_len` sequences per leaf cluster, never cutting one that fits.

    Why no cuts: with the document attention mask, the part of a document
    carried into the next sequence starts at position 0 and sees nothing of
    its beginning, so its tokens are trained without the context that decides
    them (a fact's value without the entity it belongs to). Stream packing (one
    open sequence, cut where it ends) cuts about a third of the embedded
    corpus's documents at seq_len 128; a leaf's memory block, which sees only
    its leaf's sequences, would learn such context-free values as a prior.

    Each leaf keeps up to `open_per_leaf` partly filled sequences. `add(leaf,
    ids)` appends EOT and puts the document whole into the first of them with
    room (first fit), else into a new one; when a leaf would hold more, its
    fullest open sequence is completed (padded). Only a document longer than
    `seq_len` is cut: into full `seq_len` chunks, its last piece packed like a
    document. `add` returns the sequences it completed as (leaf, tokens[T],
    segment_ids[T]); `finish()` returns the rest, in first-seen leaf order.
    """

    def __init__(
        self,
        seq_len: int,
        eot_id: int,
        pad_id: int,
        token_dtype: np.dtype,
        segment_dtype: np.dtype,
        open_per_leaf: int = 8,
    ) -> None:
        if open_per_leaf < 1:
            raise ValueError(f"open_per_leaf must be at least 1, got {open_per_leaf}.")
        self.seq_len = seq_len
        self.eot_id = eot_id
        self.pad_id = pad_id
        self.token_dtype = token_dtype
        self.segment_dtype = segment_dtype
        self.open_per_leaf = open_per_leaf
        self._open: dict[int, list[_OpenSequence]] = {}

    def _new(self) -> _OpenSequence:
        return _OpenSequence(
            tokens=np.full(self.seq_len, self.pad_id, self.token_dtype),
            segment_ids=np.zeros(self.seq_len, self.segment_dtype),
        )

    def _place(self, sequence: _OpenSequence, piece: np.ndarray) -> None:
        end = sequence.fill + len(piece)
        sequence.segments += 1
        sequence.tokens[sequence.fill : end] = piece
        sequence.segment_ids[sequence.fill : end] = sequence.segments
        sequence.fill = end

    def add(self, leaf: int, ids: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        document = np.empty(len(ids) + 1, dtype=self.token_dtype)
        document[:-1] = ids
        document[-1] = self.eot_id
        completed = []
        whole = (len(document) - 1) // self.seq_len * self.seq_len  # cut only what cannot fit
        for start in range(0, whole, self.seq_len):
            chunk = self._new()
            self._place(chunk, document[start : start + self.seq_len])
            completed.append((leaf, chunk.tokens, chunk.segment_ids))
        piece = document[whole:]
        bins = self._open.setdefault(leaf, [])
        target = next((b for b in bins if self.seq_len - b.fill >= len(piece)), None)
        if target is None:
            target = self._new()
            bins.append(target)
        self._place(target, piece)
        if target.fill == self.seq_len:
            bins.remove(target)
            completed.append((leaf, target.tokens, target.segment_ids))
        elif len(bins) > self.open_per_leaf:
            fullest = max(bins, key=lambda b: b.fill)
            bins.remove(fullest)
            completed.append((leaf, fullest.tokens, fullest.segment_ids))
        return completed

    def finish(self) -> list[tuple[int, np.ndarray, np.ndarray]]:
        remaining = [
            (leaf, s.tokens, s.segment_ids)
            for leaf, bins in self._open.items()
            for s in bins
            if s.fill
        ]
        self._open.clear()
        return remaining


def encode_record(tokens: np.ndarray, segment_ids: np.ndarray) -> bytes:
    """One record's bytes: tokens then segment ids, little-endian (prepared.py's layout)."""
    return (
        tokens.astype("<" + tokens.dtype.str[1:], copy=False).tobytes()
        + segment_ids.astype("<" + segment_ids.dtype.str[1:], copy=False).tobytes()
    )


def records_per_shard(record_bytes: int) -> int:
    """How many records of `record_bytes` a shard holds (about 256 MiB of them)."""
    return max(1, _SHARD_TARGET_BYTES // record_bytes)


class ShardWriter:
    """Writes sequences as ArrayRecord records, rotating shards, and the per-record leaf table."""

    def __init__(self, directory: str, record_bytes: int) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        self._writer_class = ArrayRecordWriter
        self.directory = directory
        self.records_per_shard = records_per_shard(record_bytes)
        self.shard_records: list[int] = []
        self.num_records = 0
        self._writer: ArrayRecordWriter | None = None
        self._leaves = open(os.path.join(directory, RECORD_LEAVES_FILE), "wb")

    def write(self, leaf: int, tokens: np.ndarray, segment_ids: np.ndarray) -> None:
        if self._writer is None or self.shard_records[-1] >= self.records_per_shard:
            self._rotate()
            assert self._writer is not None
        self._writer.write(encode_record(tokens, segment_ids))
        self._leaves.write(np.int32(leaf).astype("<i4").tobytes())
        self.shard_records[-1] += 1
        self.num_records += 1

    def _rotate(self) -> None:
        if self._writer is not None:
            self._writer.close()
        path = os.path.join(self.directory, SHARD_PATTERN.format(len(self.shard_records)))
        self._writer = self._writer_class(path, "group_size:1")
        self.shard_records.append(0)

    def close(self) -> list[dict[str, object]]:
        if self._writer is not None:
            self._writer.close()
        self._leaves.close()
        return [
            {"file": SHARD_PATTERN.format(i), "records": n}
            for i, n in enumerate(self.shard_records)
        ]
