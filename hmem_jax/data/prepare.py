"""Offline preparation: documents -> (route) -> tokens -> packed sequences -> shards + manifest.

docs/method.md: documents of the SAME LEAF CLUSTER are packed into fixed-length
sequences with an EOT after each document and a document attention mask, so
every sequence belongs to exactly one cluster path and can be trained with
that path's memory blocks. Without a tree (anchor-only pretraining) all
documents share one stream.

Packing, per leaf cluster: documents are concatenated in corpus order, each
followed by EOT, and cut into `seq_len` pieces ("concatenate and chunk", so
there is no padding except in the last sequence of each cluster). Within a
sequence, segment ids number the document pieces 1, 2, 3, ...; 0 marks
padding. A document that does not fit continues in the next sequence of the
same cluster as a new segment whose positions restart at 0 (the anchor uses
rotary embeddings, which see only relative positions, so restarting loses
nothing and lets the loader derive positions from segment ids alone).

On disk (`PreparedLayout` names the files):
- `shard-NNNNN.array_record`: one record per sequence, `tokens` then
  `segment_ids`, each `seq_len` little-endian integers of the manifest's dtypes;
  written with `group_size:1` so grain reads any record directly;
- `record_leaves.bin`: int32[num_records], the leaf index of every record, so a
  loader knows the cluster path of every sequence of a batch without reading it;
- `leaf_paths.npy` / `leaf_block_ids.npy`: int32[num_leaves, depth], per leaf its
  child index and its global block id at each level (absent without a tree);
- `tokenizer.model` or `tokenizer.json`; `probes.jsonl` (embedded source only);
- `element_counts.json`: how often each chemical element's name occurs in the
  corpus (hmem_jax/data/elements.py), which buckets the atomic-number probe;
- `manifest.json`: written last. A directory is complete iff it has one.

Bounded memory: documents stream through in chunks of
`prepare_chunk_documents`; full sequences are written as soon as they are
complete; what stays in RAM is one partially filled sequence per leaf cluster
(leaves x seq_len x 4 bytes, 512 MiB for 65,536 leaves at 2,048 tokens) and
the small per-record leaf table, whatever the corpus size. Shards rotate every
~256 MiB. Everything is written into a temporary sibling directory that is
renamed into place at the end, so a crash never leaves a half-prepared
directory that looks complete.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import json
import multiprocessing
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from absl import logging

from hmem_jax.config import DataConfig, TrainConfig
from hmem_jax.data import elements
from hmem_jax.data import tokenizer as tokenizer_lib
from hmem_jax.data.sources import Document, SourceStats, describe_source, read_documents
from hmem_jax.errors import PreparedDataError, SourceError

if TYPE_CHECKING:
    from hmem_jax.hierarchy.tree import ClusterTree


FORMAT_VERSION = 1
PACKING = "first_fit"  # LeafPacker; recorded so data packed otherwise is not reused
MANIFEST_FILE = "manifest.json"
RECORD_LEAVES_FILE = "record_leaves.bin"
LEAF_PATHS_FILE = "leaf_paths.npy"
LEAF_BLOCK_IDS_FILE = "leaf_block_ids.npy"
PROBES_FILE = "probes.jsonl"
SHARD_PATTERN = "shard-{:05d}.array_record"
_SHARD_TARGET_BYTES = 256 << 20
_NO_TREE_LEAF = ()


# --------------------------------------------------------------------------------------
# Cluster routing (the hierarchy package's ClusterTree, behind a small adapter)
# --------------------------------------------------------------------------------------


class TreeRouter:
    """What prepare needs from a ClusterTree: paths and block ids for texts, plus identity."""

    def __init__(self, tree: ClusterTree, embedder: Any | None = None) -> None:
        self.tree = tree
        self.embedder = tree.make_embedder() if embedder is None else embedder

    @classmethod
    def load(cls, tree_dir: str) -> TreeRouter:
        from hmem_jax.hierarchy.tree import ClusterTree  # the hierarchy package owns the format

        return cls(ClusterTree.load(tree_dir))

    @property
    def content_hash(self) -> str:
        return self.tree.content_hash

    @property
    def depth(self) -> int:
        return self.tree.depth

    def clusters_per_level(self) -> list[int]:
        """Number of blocks at each level 1..depth: the exclusive bound of its block ids."""
        return list(self.tree.num_clusters)

    def describe(self) -> dict[str, object]:
        return {
            "content_hash": self.content_hash,
            "depth": self.depth,
            "branching": self.tree.branching,
            "embedder": self.tree.embedder_name,
            "clusters_per_level": self.clusters_per_level(),
        }

    def route(self, texts: Sequence[str]) -> np.ndarray:
        """int32[N, depth] child index per level for each text."""
        paths = self.tree.route_texts(list(texts), self.embedder)
        return np.asarray(paths, dtype=np.int32).reshape(len(texts), self.depth)

    def block_ids(self, paths: np.ndarray) -> np.ndarray:
        return np.asarray(self.tree.block_ids(paths), dtype=np.int32).reshape(paths.shape)


# --------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------


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


class ShardWriter:
    """Writes sequences as ArrayRecord records, rotating shards, and the per-record leaf table."""

    def __init__(self, directory: str, record_bytes: int) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        self._writer_class = ArrayRecordWriter
        self.directory = directory
        self.records_per_shard = max(1, _SHARD_TARGET_BYTES // record_bytes)
        self.shard_records: list[int] = []
        self.num_records = 0
        self._writer: ArrayRecordWriter | None = None
        self._leaves = open(os.path.join(directory, RECORD_LEAVES_FILE), "wb")

    def write(self, leaf: int, tokens: np.ndarray, segment_ids: np.ndarray) -> None:
        if self._writer is None or self.shard_records[-1] >= self.records_per_shard:
            self._rotate()
            assert self._writer is not None
        self._writer.write(
            tokens.astype("<" + tokens.dtype.str[1:], copy=False).tobytes()
            + segment_ids.astype("<" + segment_ids.dtype.str[1:], copy=False).tobytes()
        )
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


def token_dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


def segment_dtype_for(seq_len: int) -> np.dtype:
    return np.dtype(np.uint16 if seq_len < 1 << 16 else np.int32)


# --------------------------------------------------------------------------------------
# Tokenization workers
# --------------------------------------------------------------------------------------

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


def _chunks(documents: Iterable[Document], size: int) -> Iterator[list[Document]]:
    chunk: list[Document] = []
    for document in documents:
        chunk.append(document)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _Tokenization:
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


# --------------------------------------------------------------------------------------
# Settings: what a prepared directory was made from
# --------------------------------------------------------------------------------------


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def requested_settings(data: DataConfig, seq_len: int, tree_hash: str | None) -> dict[str, Any]:
    """The inputs that determine a prepared dataset; equal settings mean reusable data."""
    if data.tokenizer_path:
        tokenizer_lib.check_tokenizer_path(data.tokenizer_path)
    return {
        "format_version": FORMAT_VERSION,
        "seq_len": seq_len,
        "packing": PACKING,
        "tokenizer": {
            "kind": data.tokenizer,
            "requested_vocab_size": data.vocab_size,
            "from_file_sha256": (
                _file_sha256(data.tokenizer_path) if data.tokenizer_path else None
            ),
            "train_chars": None if data.tokenizer_path else data.tokenizer_train_chars,
        },
        "tree_hash": tree_hash,
        "source": describe_source(data),
    }


def read_manifest(prepared_dir: str) -> dict[str, Any]:
    path = os.path.join(prepared_dir, MANIFEST_FILE)
    if not os.path.isfile(path):
        raise PreparedDataError(
            f"{prepared_dir!r} holds no {MANIFEST_FILE}, so it is not a complete prepared "
            "dataset. Run `python -m hmem_jax.main.prepare --out=DIR` (or let training "
            "prepare the embedded corpus)."
        )
    with open(path, encoding="utf-8") as handle:
        manifest = json.load(handle)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PreparedDataError(
            f"{prepared_dir!r} has prepared-data format {manifest.get('format_version')!r}; this "
            f"code reads format {FORMAT_VERSION}. Prepare the data again."
        )
    return manifest


def settings_mismatches(
    expected: dict[str, Any], found: dict[str, Any], prefix: str = ""
) -> list[str]:
    """Human-readable differences between two settings dicts, one line per leaf field."""
    lines = []
    for key in sorted(set(expected) | set(found)):
        want, have = expected.get(key), found.get(key)
        if isinstance(want, dict) and isinstance(have, dict):
            lines += settings_mismatches(want, have, f"{prefix}{key}.")
        elif want != have:
            lines.append(f"{prefix}{key}: requested {want!r}, prepared {have!r}")
    return lines


# --------------------------------------------------------------------------------------
# prepare / ensure_prepared
# --------------------------------------------------------------------------------------


def _training_sample(config: DataConfig) -> list[str]:
    """The first `tokenizer_train_chars` characters of the corpus, as whole documents; a
    corpus with no document at all is a SourceError naming what was read."""
    texts, total = [], 0
    stats = SourceStats()
    for document in read_documents(config, stats):
        texts.append(document.text)
        total += len(document.text)
        if total >= config.tokenizer_train_chars:
            break
    if not texts:
        raise SourceError(
            f"The corpus ({describe_source(config)}) has no document with text "
            f"({stats.malformed_skipped} malformed entries skipped, {stats.empty_skipped} empty): "
            "check DataConfig.source and DataConfig.path (jsonl: one JSON object with a string "
            "'text' per line)."
        )
    return texts


def prepare(
    data: DataConfig,
    seq_len: int,
    out_dir: str,
    tree_dir: str | None = None,
    router: TreeRouter | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Prepares `out_dir` from the configured source; returns the manifest.

    `tree_dir` (or an already built `router`) routes documents to leaf
    clusters; with neither, everything is packed into one stream. `out_dir`
    must not exist yet: prepared data is never overwritten.
    """
    if os.path.exists(out_dir):
        raise PreparedDataError(
            f"{out_dir!r} already exists; prepare never overwrites data. "
            "Delete it or choose another --out."
        )
    if router is None and tree_dir:
        router = TreeRouter.load(tree_dir)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(
        parent, f".{os.path.basename(out_dir)}.incomplete-{uuid.uuid4().hex[:8]}"
    )
    os.makedirs(staging)
    try:
        manifest = _prepare_into(staging, data, seq_len, router, progress)
        _publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _publish(staging: str, out_dir: str) -> None:
    """Renames the finished staging directory into place (atomic on one filesystem)."""
    try:
        os.rename(staging, out_dir)
    except OSError as error:
        raise PreparedDataError(
            f"Could not move the prepared data into {out_dir!r} ({error}); "
            "another process may have prepared it at the same time."
        ) from error


def _prepare_into(
    staging: str, data: DataConfig, seq_len: int, router: TreeRouter | None, progress: bool
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    started = time.perf_counter()
    tokenizer = tokenizer_lib.build_tokenizer(
        data.tokenizer, data.tokenizer_path, _training_sample(data), data.vocab_size
    )
    tokenizer.save(staging)
    if tokenizer.vocab_size < data.vocab_size:
        logging.warning(
            "The tokenizer has %d tokens, fewer than DataConfig.vocab_size = %d "
            "(the corpus is small); the model's vocabulary still covers it.",
            tokenizer.vocab_size,
            data.vocab_size,
        )
    if tokenizer.vocab_size > data.vocab_size:
        raise PreparedDataError(
            f"The tokenizer at {data.tokenizer_path!r} has {tokenizer.vocab_size} tokens, more "
            f"than DataConfig.vocab_size = {data.vocab_size}. Raise DataConfig.vocab_size (and "
            "ModelConfig.vocab_size) to at least that."
        )
    tokenizer_seconds = time.perf_counter() - started

    token_dtype = token_dtype_for(tokenizer.vocab_size)
    segment_dtype = segment_dtype_for(seq_len)
    packer = LeafPacker(seq_len, tokenizer.eot_id, tokenizer.pad_id, token_dtype, segment_dtype)
    writer = ShardWriter(staging, seq_len * (token_dtype.itemsize + segment_dtype.itemsize))
    leaf_of_path: dict[tuple[int, ...], int] = {}
    leaf_documents: list[int] = []
    leaf_tokens: list[int] = []
    leaf_sequences: list[int] = []
    stats = SourceStats()
    route_seconds = 0.0
    tokenization = _Tokenization(tokenizer, data.prepare_workers)
    bar = tqdm(desc="prepare", unit="doc", disable=not progress, dynamic_ncols=True)
    element_counter = elements.ElementCounter()

    def emit(completed: list[tuple[int, np.ndarray, np.ndarray]]) -> None:
        for leaf, tokens, segment_ids in completed:
            writer.write(leaf, tokens, segment_ids)
            leaf_sequences[leaf] += 1

    try:
        chunks = _chunks(read_documents(data, stats), data.prepare_chunk_documents)
        for chunk, flat_ids, lengths in tokenization.map(chunks):
            element_counter.add(document.text for document in chunk)
            route_started = time.perf_counter()
            if router is not None:
                paths = router.route([document.text for document in chunk])
                keys = [tuple(int(i) for i in row) for row in paths]
            else:
                keys = [_NO_TREE_LEAF] * len(chunk)
            route_seconds += time.perf_counter() - route_started
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            for number, key in enumerate(keys):
                leaf = leaf_of_path.get(key)
                if leaf is None:
                    leaf = leaf_of_path[key] = len(leaf_of_path)
                    leaf_documents.append(0)
                    leaf_tokens.append(0)
                    leaf_sequences.append(0)
                ids = flat_ids[offsets[number] : offsets[number + 1]]
                leaf_documents[leaf] += 1
                leaf_tokens[leaf] += len(ids) + 1  # + EOT
                emit(packer.add(leaf, ids))
            bar.update(len(chunk))
        emit(packer.finish())
    finally:
        tokenization.close()
        bar.close()
        shards = writer.close()

    if writer.num_records == 0:
        raise PreparedDataError(
            f"The source {describe_source(data)} produced no documents "
            f"({stats.problems() or 'it is empty'}); nothing to prepare."
        )
    if stats.problems():
        logging.warning("Source repairs while preparing: %s", stats.problems())

    element_counter.save(staging)
    leaf_paths = np.array(list(leaf_of_path), dtype=np.int32).reshape(len(leaf_of_path), -1)
    tree_description = None
    if router is not None:
        np.save(os.path.join(staging, LEAF_PATHS_FILE), leaf_paths)
        np.save(os.path.join(staging, LEAF_BLOCK_IDS_FILE), router.block_ids(leaf_paths))
        tree_description = router.describe()

    probes = None
    if data.source == "embedded":
        from hmem_jax.data import encyclopedia

        corpus = encyclopedia.cached_corpus(data.embedded_entities, data.embedded_seed)
        probes = {
            "file": PROBES_FILE,
            "count": encyclopedia.write_probes(corpus.probes, os.path.join(staging, PROBES_FILE)),
        }

    elapsed = time.perf_counter() - started
    manifest = {
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": requested_settings(
            data, seq_len, router.content_hash if router is not None else None
        ),
        "seq_len": seq_len,
        "token_dtype": token_dtype.str,
        "segment_dtype": segment_dtype.str,
        "record_layout": "tokens[seq_len] then segment_ids[seq_len], little-endian",
        "positions": "restart at 0 for every segment (each chunk of a document cut at seq_len too)",
        "tokenizer": tokenizer.describe(),
        "tree": tree_description,
        "source": describe_source(data),
        "num_records": writer.num_records,
        "num_documents": stats.documents,
        "num_tokens": int(sum(leaf_tokens)),
        "num_padding_tokens": writer.num_records * seq_len - int(sum(leaf_tokens)),
        "shards": shards,
        "leaves": {
            "count": len(leaf_of_path),
            "documents": leaf_documents,
            "tokens": leaf_tokens,
            "sequences": leaf_sequences,
        },
        "corpus": stats.as_dict(),
        "probes": probes,
        "timing_s": {
            "total": round(elapsed, 3),
            "tokenizer": round(tokenizer_seconds, 3),
            "route": round(route_seconds, 3),
        },
    }
    with open(os.path.join(staging, MANIFEST_FILE), "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1)
    logging.info(
        "Prepared %d documents into %d sequences of %d tokens (%d leaves) in %.1f s.",
        stats.documents,
        writer.num_records,
        seq_len,
        len(leaf_of_path),
        elapsed,
    )
    return manifest


def ensure_prepared(
    config: TrainConfig,
    out_dir: str,
    tree_dir: str | None = None,
    router: TreeRouter | None = None,
    progress: bool = True,
) -> str:
    """`out_dir` holding prepared data for `config` (and the tree), preparing it if absent.

    Reuses an existing complete directory only if it was prepared with the same
    settings (seq_len, tokenizer, tree hash, source); otherwise raises
    `PreparedDataError` naming every difference. A directory without a
    manifest is never touched (it may be someone's data, or a crashed run's).
    """
    if router is None and tree_dir:
        router = TreeRouter.load(tree_dir)
    wanted = requested_settings(
        config.data, config.seq_len, router.content_hash if router is not None else None
    )
    if not os.path.exists(out_dir):
        try:
            prepare(config.data, config.seq_len, out_dir, router=router, progress=progress)
        except PreparedDataError:
            if not os.path.isfile(os.path.join(out_dir, MANIFEST_FILE)):
                raise  # a real failure, not a concurrent preparer that finished first
    manifest = read_manifest(out_dir)
    differences = settings_mismatches(wanted, manifest["settings"])
    if differences:
        raise PreparedDataError(
            f"The prepared data in {out_dir!r} was made with other settings than this run "
            "asks for:\n  " + "\n  ".join(differences) + "\nRestore the run's settings, or "
            "point DataConfig.prepared_dir at a new directory (or delete this one) to prepare "
            "the data again."
        )
    return out_dir
