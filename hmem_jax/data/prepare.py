"""Preparation: documents -> (route) -> tokens -> packed sequences -> shards + manifest.

The steps live in their own modules: `routing.TreeRouter` routes documents to
leaf clusters, `tokenize_pool.TokenizerPool` tokenizes them in worker
processes, `packing.LeafPacker` packs each leaf's documents into sequences and
`packing.ShardWriter` writes them; `prepared.py` defines the format written.
This module runs them and writes the manifest.

Bounded memory: documents stream through in chunks of
`prepare_chunk_documents`; full sequences are written as soon as they are
complete; what stays in RAM is a few partially filled sequences per leaf cluster
and the small per-record leaf table, whatever the corpus size. Shards rotate
every ~256 MiB. Everything is written into a temporary sibling directory that
is renamed into place at the end, so a crash never leaves a half-prepared
directory that looks complete.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from absl import logging

from hmem_jax import paths
from hmem_jax.config import DataConfig, TrainConfig, check_given
from hmem_jax.data import elements
from hmem_jax.data import tokenizer as tokenizer_lib
from hmem_jax.data.document import Document
from hmem_jax.data.packing import LeafPacker, ShardWriter
from hmem_jax.data.prepared import (
    FORMAT_VERSION,
    LEAF_BLOCK_IDS_FILE,
    LEAF_PATHS_FILE,
    MANIFEST_FILE,
    PROBES_FILE,
    read_manifest,
    requested_settings,
    segment_dtype_for,
    settings_mismatches,
    token_dtype_for,
)
from hmem_jax.data.progress import PrepareProgress
from hmem_jax.data.routing import TreeRouter
from hmem_jax.data.sources import SourceStats, describe_source, read_documents, source_units
from hmem_jax.data.tokenize_pool import TokenizerPool
from hmem_jax.errors import PreparedDataError, SourceError

_NO_TREE_LEAF = ()


def _chunks(documents: Iterable[Document], size: int) -> Iterator[list[Document]]:
    chunk: list[Document] = []
    for document in documents:
        chunk.append(document)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


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
    staging = staging_dir_for(out_dir)
    try:
        manifest = _prepare_into(staging, data, seq_len, router, progress)
        publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def staging_dir_for(out_dir: str) -> str:
    """A new hidden folder beside `out_dir` to prepare into (made here); `publish` renames it
    into place when complete, so `out_dir` never exists half-written."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(
        parent, f".{os.path.basename(out_dir)}.incomplete-{uuid.uuid4().hex[:8]}"
    )
    os.makedirs(staging)
    return staging


def publish(staging: str, out_dir: str) -> None:
    """Renames the finished staging directory into place (atomic on one filesystem)."""
    try:
        os.rename(staging, out_dir)
    except OSError as error:
        raise PreparedDataError(
            f"Could not move the prepared data into {out_dir!r} ({error}); "
            "another process may have prepared it at the same time."
        ) from error


@dataclasses.dataclass
class PackedCorpus:
    """What packing a corpus produced, for its manifest: per leaf (in first-seen order, the
    leaf index of its records) its path and counts; the shards written; what reading found."""

    leaf_keys: list[tuple[int, ...]]
    leaf_documents: list[int]
    leaf_tokens: list[int]
    leaf_sequences: list[int]
    shards: list[dict[str, object]]
    num_records: int
    stats: SourceStats
    element_counts: dict[str, int]
    timing_s: dict[str, float]


def make_tokenizer(data: DataConfig, staging: str) -> tokenizer_lib.Tokenizer:
    """The run's tokenizer (DataConfig.tokenizer_path, or trained on the corpus's first
    characters), saved into `staging` and checked against DataConfig.vocab_size."""
    tokenizer = tokenizer_lib.build_tokenizer(
        data.tokenizer, data.tokenizer_path, _training_sample(data), data.vocab_size
    )
    tokenizer.save(staging)
    if tokenizer.vocab_size < data.vocab_size and not data.tokenizer_path:
        logging.warning(
            "The tokenizer has %d tokens, fewer than DataConfig.vocab_size = %d "
            "(the corpus is small); the model's vocabulary still covers it.",
            tokenizer.vocab_size,
            data.vocab_size,
        )  # a given tokenizer's vocabulary is padded on purpose (e.g. 50,277 -> 50,432)
    if tokenizer.vocab_size > data.vocab_size:
        raise PreparedDataError(
            f"The tokenizer at {data.tokenizer_path!r} has {tokenizer.vocab_size} tokens, more "
            f"than DataConfig.vocab_size = {data.vocab_size}. Raise DataConfig.vocab_size (and "
            "ModelConfig.vocab_size) to at least that."
        )
    return tokenizer


def record_dtypes(tokenizer: tokenizer_lib.Tokenizer, seq_len: int) -> tuple[np.dtype, np.dtype]:
    """(token dtype, segment id dtype) of the records."""
    return token_dtype_for(tokenizer.vocab_size), segment_dtype_for(seq_len)


def _prepare_into(
    staging: str, data: DataConfig, seq_len: int, router: TreeRouter | None, progress: bool
) -> dict[str, Any]:
    started = time.perf_counter()
    tokenizer = make_tokenizer(data, staging)
    tokenizer_seconds = time.perf_counter() - started

    token_dtype, segment_dtype = record_dtypes(tokenizer, seq_len)
    packer = LeafPacker(seq_len, tokenizer.eot_id, tokenizer.pad_id, token_dtype, segment_dtype)
    writer = ShardWriter(staging, seq_len * (token_dtype.itemsize + segment_dtype.itemsize))
    leaf_of_path: dict[tuple[int, ...], int] = {}
    leaf_documents: list[int] = []
    leaf_tokens: list[int] = []
    leaf_sequences: list[int] = []
    stats = SourceStats()
    route_seconds = 0.0
    tokenization = TokenizerPool(tokenizer, data.prepare_workers)
    units = source_units(data)
    report = PrepareProgress(len(units), enabled=progress)
    element_counter = elements.ElementCounter()

    def emit(completed: list[tuple[int, np.ndarray, np.ndarray]]) -> None:
        for leaf, tokens, segment_ids in completed:
            writer.write(leaf, tokens, segment_ids)
            leaf_sequences[leaf] += 1

    try:
        documents = read_documents(data, stats, units, unit_done=report.file_done)
        chunks = _chunks(documents, data.prepare_chunk_documents)
        for chunk, flat_ids, lengths in tokenization.map(chunks):
            element_counter.add(document.text for document in chunk)
            route_started = time.perf_counter()
            keys = route_keys(router, [document.text for document in chunk])
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
            report.add_documents(len(chunk))
        emit(packer.finish())
    finally:
        tokenization.close()
        report.close()
        shards = writer.close()

    packed = PackedCorpus(
        leaf_keys=list(leaf_of_path),
        leaf_documents=leaf_documents,
        leaf_tokens=leaf_tokens,
        leaf_sequences=leaf_sequences,
        shards=shards,
        num_records=writer.num_records,
        stats=stats,
        element_counts=element_counter.counts,
        timing_s={"tokenizer": tokenizer_seconds, "route": route_seconds},
    )
    return write_manifest(staging, data, seq_len, tokenizer, router, packed, started)


def route_keys(router: TreeRouter | None, texts: list[str]) -> list[tuple[int, ...]]:
    """The cluster path of each text (one shared stream without a tree)."""
    if router is None:
        return [_NO_TREE_LEAF] * len(texts)
    return [tuple(int(i) for i in row) for row in router.route(texts)]


def write_manifest(
    staging: str,
    data: DataConfig,
    seq_len: int,
    tokenizer: tokenizer_lib.Tokenizer,
    router: TreeRouter | None,
    packed: PackedCorpus,
    started: float,
) -> dict[str, Any]:
    """The files beside the shards (element counts, leaf paths and block ids, probes) and,
    last, the manifest; returns the manifest."""
    stats = packed.stats
    if packed.num_records == 0:
        raise PreparedDataError(
            f"The source {describe_source(data)} produced no documents "
            f"({stats.problems() or 'it is empty'}); nothing to prepare."
        )
    if stats.problems():
        logging.warning("Source repairs while preparing: %s", stats.problems())

    elements.save_counts(packed.element_counts, staging)
    leaves = len(packed.leaf_keys)
    leaf_paths = np.array(packed.leaf_keys, dtype=np.int32).reshape(leaves, -1)
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

    token_dtype, segment_dtype = record_dtypes(tokenizer, seq_len)
    elapsed = time.perf_counter() - started
    num_tokens = int(sum(packed.leaf_tokens))
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
        "num_records": packed.num_records,
        "num_documents": stats.documents,
        "num_tokens": num_tokens,
        "num_padding_tokens": packed.num_records * seq_len - num_tokens,
        "shards": packed.shards,
        "leaves": {
            "count": leaves,
            "documents": packed.leaf_documents,
            "tokens": packed.leaf_tokens,
            "sequences": packed.leaf_sequences,
        },
        "corpus": stats.as_dict(),
        "probes": probes,
        "timing_s": {
            "total": round(elapsed, 3),
            **{name: round(value, 3) for name, value in packed.timing_s.items()},
        },
    }
    with open(os.path.join(staging, MANIFEST_FILE), "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1)
    logging.info(
        "Prepared %d documents into %d sequences of %d tokens (%d leaves) in %.1f s.",
        stats.documents,
        packed.num_records,
        seq_len,
        leaves,
        elapsed,
    )
    return manifest


def ensure_prepared(
    config: TrainConfig,
    out_dir: str,
    tree_dir: str | None = None,
    router: TreeRouter | None = None,
    progress: bool = True,
    beam_args: Sequence[str] = (),
) -> str:
    """`out_dir` holding prepared data for `config` (and the tree), preparing it if absent
    (with `beam_args`, Beam's pipeline options, by the Beam pipeline: data/beam_prepare.py).

    Reuses an existing complete directory only if it was prepared with the same
    settings (seq_len, tokenizer, tree hash, source); otherwise raises
    `PreparedDataError` naming every difference. A directory without a
    manifest is never touched (it may be someone's data, or a crashed run's).
    """
    check_given(config.data)  # a paper gin's %gin.REQUIRED corpus or tokenizer, not given
    if router is None and tree_dir:
        router = TreeRouter.load(tree_dir)
    wanted = requested_settings(
        config.data, config.seq_len, router.content_hash if router is not None else None
    )

    def make(local: str) -> None:
        if beam_args:
            from hmem_jax.data.beam_prepare import prepare_with_beam

            prepare_with_beam(config.data, config.seq_len, local, tree_dir, beam_args)
        else:
            prepare(config.data, config.seq_len, local, router=router, progress=progress)

    if paths.is_remote(out_dir):
        if not paths.isfile(paths.join(out_dir, MANIFEST_FILE)):
            if beam_args:  # the pipeline's workers write into the URL themselves
                make(out_dir)
            else:
                _prepare_and_upload(make, out_dir)
    elif not os.path.exists(out_dir):
        try:
            make(out_dir)
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


def _prepare_and_upload(make: Callable[[str], None], url: str) -> None:
    """`make` the data in a local scratch folder, then upload it to `url` with the manifest
    last (an interrupted upload leaves no manifest, so it is not taken for complete data)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="hmem_prepare_") as scratch:
        local = os.path.join(scratch, "data")
        make(local)
        paths.upload_tree(local, url, last=(MANIFEST_FILE,))
