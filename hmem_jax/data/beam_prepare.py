"""`prepare` on Apache Beam: the same prepared folder, made by many workers.

The in-process path (data/prepare.py) reads the corpus in order, routes and
tokenizes it, packs each leaf's documents with `LeafPacker` and writes the
sequences in the order the packer completes them. This pipeline computes the
same records in the same order with per-stage work spread over workers:

1. read: one element per unit of the source (`sources.source_units`: a file of
   a jsonl or text_dir corpus), read with `sources.read_unit`; each document
   gets the order key (unit, number within the unit), the order in which the
   in-process path reads it.
2. route and tokenize in batches (one TreeRouter and tokenizer per worker,
   loaded once in `setup`): the path of every document and its token ids.
3. pack per leaf: the leaf's documents, sorted by order key, go through a
   `LeafPacker` of their own. A packer's choices for a leaf depend only on that
   leaf's documents in order, so these are the sequences the in-process packer
   makes for that leaf; each gets the key of the moment the in-process path
   completes it: (0, order key of the document whose `add` completed it, its
   number in that `add`), or (1, the leaf's first order key, its number in
   `finish`) for the sequences left open at the end (`finish` walks the leaves
   in first-seen order).
4. place: the count of sequences per unit gives each unit's first record
   position; a unit's sequences sorted by key take the positions after it, so
   sorting is never global (one unit's sequences at a time).
5. write: records grouped by shard (position // records per shard, the
   in-process writer's rotation) are written in position order, with that
   shard's slice of the per-record leaf table; leaf indices are the leaves'
   first-seen ranks, as the in-process path numbers them.

The result equals the in-process folder file for file (the manifest up to its
`created` time and timings): the same records in the same shards and the same
leaf table, so a run over either trains identically. What reading found is
counted in Beam's metrics (namespace `hmem_jax.prepare`: documents, each kind
of skip or repair, tokens, sequences and leaves) and recorded in the manifest
as the in-process path does. Per leaf, Beam's distributions `leaf_documents`,
`leaf_tokens` and `leaf_sequences` give min / mean / max over the leaves (a
counter per leaf would be 65,536 of them); each leaf's own counts are in the
manifest.
A failed pipeline leaves only its hidden staging folder (removed), never a
folder with a manifest. The output may be a gs:// or s3:// URL (on Dataflow it
must be storage every worker reaches): workers then write their shards into
it, and the manifest is uploaded after everything else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from absl import logging

from hmem_jax import paths
from hmem_jax.config import DataConfig
from hmem_jax.data import elements
from hmem_jax.data import tokenizer as tokenizer_lib
from hmem_jax.data.packing import LeafPacker, encode_record, records_per_shard
from hmem_jax.data.prepare import (
    PackedCorpus,
    make_tokenizer,
    publish,
    record_dtypes,
    route_keys,
    staging_dir_for,
    write_manifest,
)
from hmem_jax.data.prepared import MANIFEST_FILE, RECORD_LEAVES_FILE, SHARD_PATTERN
from hmem_jax.data.routing import TreeRouter
from hmem_jax.data.sources import SourceStats, read_unit, source_units
from hmem_jax.errors import PreparedDataError

_NAMESPACE = "hmem_jax.prepare"
_PARTS_DIR = "_beam_parts"
_FINISH = 1  # key of the sequences `LeafPacker.finish` returns: after every `add`


def prepare_with_beam(
    data: DataConfig,
    seq_len: int,
    out_dir: str,
    tree_dir: str | None,
    pipeline_args: Sequence[str],
) -> dict[str, Any]:
    """Prepare `out_dir` with a Beam pipeline (`pipeline_args`: Beam's own options, e.g.
    --runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing);
    returns the manifest. Like `prepare`, `out_dir` must not exist yet."""

    if paths.exists(out_dir):
        raise PreparedDataError(
            f"{out_dir!r} already exists; prepare never overwrites data. "
            "Delete it or choose another --out."
        )
    remote = paths.is_remote(out_dir)
    # Workers write the shards where the folder will be: beside it (renamed into place at the
    # end) for a local folder, into it for a URL (an object store has no rename; the manifest,
    # uploaded last, is what makes the folder complete). The files made here (tokenizer,
    # leaf tables, manifest) go into `staging`, a local folder, uploaded at the end for a URL.
    staging = tempfile.mkdtemp(prefix="hmem_beam_") if remote else staging_dir_for(out_dir)
    shards_dir = out_dir if remote else staging
    try:
        started = time.perf_counter()
        tokenizer = make_tokenizer(data, staging)
        tokenizer_seconds = time.perf_counter() - started
        token_dtype, segment_dtype = record_dtypes(tokenizer, seq_len)
        record_bytes = seq_len * (token_dtype.itemsize + segment_dtype.itemsize)
        stage = _Stages(
            data=data,
            seq_len=seq_len,
            tree_dir=tree_dir,
            tokenizer_kind=tokenizer.kind,
            tokenizer_data=tokenizer.data,
            per_shard=records_per_shard(record_bytes),
            parts=paths.join(shards_dir, _PARTS_DIR),
            shards_dir=shards_dir,
        )
        paths.makedirs(stage.parts)
        metrics = _run_pipeline(stage, source_units(data), pipeline_args)
        logging.info("Beam metrics of %s: %s", out_dir, json.dumps(metrics, sort_keys=True))
        packed = _collect(stage, staging, tokenizer_seconds)
        router = TreeRouter.load(tree_dir) if tree_dir else None
        paths.remove_tree(stage.parts)
        manifest = write_manifest(staging, data, seq_len, tokenizer, router, packed, started)
        if remote:
            paths.upload_tree(staging, out_dir, last=(MANIFEST_FILE,))
        else:
            publish(staging, out_dir)
    except BaseException:
        if remote:
            paths.remove_tree(out_dir)  # it did not exist: everything in it is this run's
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if remote:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


@dataclasses.dataclass(frozen=True)
class _Stages:
    """What every stage needs, pickled to the workers."""

    data: DataConfig
    seq_len: int
    tree_dir: str | None
    tokenizer_kind: str
    tokenizer_data: bytes
    per_shard: int
    parts: str  # small per-stage outputs (leaf summaries, counts, shard leaf tables)
    shards_dir: str  # a local folder or a URL every worker can write

    def tokenizer(self) -> tokenizer_lib.Tokenizer:
        return tokenizer_lib.tokenizer_from_bytes(self.tokenizer_kind, self.tokenizer_data)


def _run_pipeline(stage: _Stages, units: list[str], pipeline_args: Sequence[str]) -> dict[str, Any]:
    """Runs the pipeline to its end; returns its metrics (`_metric_values`)."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    options = PipelineOptions(list(pipeline_args))
    pipeline = beam.Pipeline(options=options)
    documents = (
        pipeline
        | "units" >> beam.Create(list(enumerate(units)))
        | "spread units" >> beam.Reshuffle()
        | "read" >> beam.ParDo(_ReadUnit(stage))
    )
    _ = (
        documents
        | "element names" >> beam.Map(lambda item: _element_counts([item[1]]))
        | "sum names" >> beam.CombineGlobally(_sum_counts)
        | "write names" >> beam.Map(_write_json, paths.join(stage.parts, "elements.json"))
    )
    routed = (
        documents
        | "batch" >> beam.BatchElements(min_batch_size=64, max_batch_size=1024)
        | "route and tokenize" >> beam.ParDo(_RouteAndTokenize(stage))
    )
    packed = (
        routed
        | "by leaf" >> beam.GroupByKey()
        | "pack leaf" >> beam.ParDo(_PackLeaf(stage)).with_outputs("leaf", main="sequence")
    )
    leaves = (
        packed.leaf
        | "all leaves" >> beam.combiners.ToList()
        | "number leaves" >> beam.Map(_number_leaves, stage.parts)
    )
    sequences = packed.sequence
    firsts = (
        sequences
        | "bucket of each" >> beam.Map(lambda item: item[0])
        | "count per bucket" >> beam.combiners.Count.PerElement()
        | "all counts" >> beam.combiners.ToList()
        | "first positions" >> beam.Map(_first_positions)
    )
    _ = (
        sequences
        | "by bucket" >> beam.GroupByKey()
        | "place"
        >> beam.ParDo(
            _Place(stage),
            firsts=beam.pvalue.AsSingleton(firsts),
            leaf_index=beam.pvalue.AsSingleton(leaves),
        )
        | "by shard" >> beam.GroupByKey()
        | "write shard" >> beam.ParDo(_WriteShard(stage))
    )
    result = pipeline.run()
    result.wait_until_finish()
    return _metric_values(result)


def _metric_values(result: Any) -> dict[str, Any]:
    """The pipeline's `hmem_jax.prepare` counters (name -> total) and distributions (name ->
    min, mean, max over the leaves), as the runner committed them."""
    from apache_beam.metrics.metric import MetricsFilter

    found = result.metrics().query(MetricsFilter().with_namespace(_NAMESPACE))
    values: dict[str, Any] = {c.key.metric.name: c.committed for c in found["counters"]}
    for d in found["distributions"]:
        if d.committed is not None and d.committed.count:
            values[d.key.metric.name] = {
                "min": d.committed.min,
                "mean": round(d.committed.mean, 1),
                "max": d.committed.max,
            }
    return values


def _element_counts(texts: Iterable[str]) -> dict[str, int]:
    counter = elements.ElementCounter()
    counter.add(texts)
    return {name: n for name, n in counter.counts.items() if n}


def _sum_counts(parts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for part in parts:
        for name, n in part.items():
            total[name] = total.get(name, 0) + n
    return total


def _write_json(value: Any, path: str) -> None:
    paths.write_text(path, json.dumps(value))


def _read_json(path: str) -> Any:
    return json.loads(paths.read_text(path))


class _ReadUnit:
    """unit -> (order key, text) per document, in the unit's order; the reading's repairs and
    skips are counted in Beam metrics and in a per-unit stats file."""

    def __new__(cls, stage: _Stages) -> Any:
        import apache_beam as beam

        class ReadUnit(beam.DoFn):
            def process(self, element: tuple[int, str]) -> Iterator[tuple[tuple[int, int], str]]:
                number, unit = element
                stats = SourceStats()
                for k, document in enumerate(read_unit(stage.data, unit, stats)):
                    yield (number, k), document.text
                _write_json(stats.as_dict(), paths.join(stage.parts, f"stats-{number:08d}.json"))
                for name, value in stats.as_dict().items():
                    beam.metrics.Metrics.counter(_NAMESPACE, name).inc(value)

        return ReadUnit()


class _RouteAndTokenize:
    """A batch of (order key, text) -> (path, (order key, token ids)) per document."""

    def __new__(cls, stage: _Stages) -> Any:
        import apache_beam as beam

        class RouteAndTokenize(beam.DoFn):
            def setup(self) -> None:
                self.router = TreeRouter.load(stage.tree_dir) if stage.tree_dir else None
                self.tokenizer = stage.tokenizer()

            def process(self, batch: list[tuple[tuple[int, int], str]]) -> Iterator[Any]:
                texts = [text for _, text in batch]
                keys = route_keys(self.router, texts)
                for (order, _), path, ids in zip(
                    batch, keys, self.tokenizer.encode_batch(texts), strict=True
                ):
                    yield path, (order, np.asarray(ids, dtype=np.int64))

        return RouteAndTokenize()


class _PackLeaf:
    """(path, documents) -> its sequences keyed by when the in-process packer completes them,
    as (bucket, (key, path, record bytes)); and to output 'leaf' the leaf's summary."""

    def __new__(cls, stage: _Stages) -> Any:
        import apache_beam as beam

        class PackLeaf(beam.DoFn):
            def setup(self) -> None:
                tokenizer = stage.tokenizer()
                self.eot, self.pad = tokenizer.eot_id, tokenizer.pad_id
                self.dtypes = record_dtypes(tokenizer, stage.seq_len)
                self.finish_bucket = 1 << 62

            def process(self, element: tuple[tuple[int, ...], Iterable[Any]]) -> Iterator[Any]:
                path, documents = element
                ordered = sorted(documents, key=lambda document: document[0])
                packer = LeafPacker(stage.seq_len, self.eot, self.pad, *self.dtypes)
                tokens = sequences = 0
                for order, ids in ordered:
                    tokens += len(ids) + 1
                    for j, (_, t, s) in enumerate(packer.add(0, ids)):
                        sequences += 1
                        yield order[0], ((0, order, j), path, encode_record(t, s))
                first = ordered[0][0]
                for j, (_, t, s) in enumerate(packer.finish()):
                    sequences += 1
                    yield self.finish_bucket, ((_FINISH, first, j), path, encode_record(t, s))
                metrics = beam.metrics.Metrics
                metrics.counter(_NAMESPACE, "sequences").inc(sequences)
                metrics.counter(_NAMESPACE, "tokens").inc(tokens)
                metrics.counter(_NAMESPACE, "leaves").inc()
                for name, value in (
                    ("leaf_documents", len(ordered)),
                    ("leaf_tokens", tokens),
                    ("leaf_sequences", sequences),
                ):
                    metrics.distribution(_NAMESPACE, name).update(value)
                yield beam.pvalue.TaggedOutput(
                    "leaf",
                    {
                        "path": list(path),
                        "first": list(first),
                        "documents": len(ordered),
                        "tokens": tokens,
                        "sequences": sequences,
                    },
                )

        return PackLeaf()


def _number_leaves(summaries: list[dict[str, Any]], parts: str) -> dict[tuple[int, ...], int]:
    """Leaf index of each path: its first-seen rank (the in-process numbering); the summaries
    in that order are written for the manifest."""
    ordered = sorted(summaries, key=lambda leaf: tuple(leaf["first"]))
    _write_json(ordered, paths.join(parts, "leaves.json"))
    return {tuple(leaf["path"]): index for index, leaf in enumerate(ordered)}


def _first_positions(counts: list[tuple[int, int]]) -> dict[int, int]:
    """Bucket -> position of its first record (buckets in order: units, then the finish)."""
    firsts, position = {}, 0
    for bucket, count in sorted(counts):
        firsts[bucket] = position
        position += count
    return firsts


class _Place:
    """A bucket's sequences, sorted by key, take the positions from its first one:
    -> (shard, (position, leaf index, record bytes))."""

    def __new__(cls, stage: _Stages) -> Any:
        import apache_beam as beam

        class Place(beam.DoFn):
            def process(
                self,
                element: tuple[int, Iterable[Any]],
                firsts: dict[int, int],
                leaf_index: dict[tuple[int, ...], int],
            ) -> Iterator[Any]:
                bucket, items = element
                position = firsts[bucket]
                for _, path, record in sorted(items, key=lambda item: item[0]):
                    yield position // stage.per_shard, (position, leaf_index[tuple(path)], record)
                    position += 1

        return Place()


class _WriteShard:
    """(shard, records) -> the ArrayRecord shard in position order, and its leaf table part."""

    def __new__(cls, stage: _Stages) -> Any:
        import apache_beam as beam

        class WriteShard(beam.DoFn):
            def process(self, element: tuple[int, Iterable[Any]]) -> Iterator[int]:
                shard, items = element
                ordered = sorted(items, key=lambda item: item[0])
                _write_array_record(
                    [record for _, _, record in ordered],
                    paths.join(stage.shards_dir, SHARD_PATTERN.format(shard)),
                )
                leaves = np.array([leaf for _, leaf, _ in ordered], dtype="<i4")
                paths.write_bytes(
                    paths.join(stage.parts, f"leaves-{shard:08d}.bin"), leaves.tobytes()
                )
                yield shard

        return WriteShard()


def _write_array_record(records: list[bytes], path: str) -> None:
    """An ArrayRecord file of `records` at `path`; for a URL written locally, then uploaded
    (the ArrayRecord writer writes local files)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    with contextlib.ExitStack() as stack:
        local = path
        if paths.is_remote(path):
            local = os.path.join(stack.enter_context(tempfile.TemporaryDirectory()), "shard")
        writer = ArrayRecordWriter(local, "group_size:1")
        try:
            for record in records:
                writer.write(record)
        finally:
            writer.close()
        if local != path:
            paths.upload_file(local, path)


def _collect(stage: _Stages, staging: str, tokenizer_seconds: float) -> PackedCorpus:
    """Read the pipeline's small outputs back into what the manifest records; join the
    per-shard leaf tables into the record leaf table (written into `staging`)."""
    leaves = _read_json(paths.join(stage.parts, "leaves.json"))
    parts = {os.path.basename(name.rstrip("/")): name for name in paths.find_files(stage.parts)}
    stats = SourceStats()
    for name in sorted(parts):
        if name.startswith("stats-"):
            for field, value in _read_json(parts[name]).items():
                setattr(stats, field, getattr(stats, field) + value)
    counts = elements.ElementCounter().counts
    if "elements.json" in parts:
        counts.update(_read_json(parts["elements.json"]))
    tables = sorted(name for name in parts if name.startswith("leaves-"))
    shards, num_records = [], 0
    with open(os.path.join(staging, RECORD_LEAVES_FILE), "wb") as table:
        for number, name in enumerate(tables):
            if name != f"leaves-{number:08d}.bin":
                raise PreparedDataError(f"Beam wrote no shard {number}; the pipeline is broken.")
            data = paths.read_bytes(parts[name])
            table.write(data)
            shards.append({"file": SHARD_PATTERN.format(number), "records": len(data) // 4})
            num_records += len(data) // 4
    return PackedCorpus(
        leaf_keys=[tuple(leaf["path"]) for leaf in leaves],
        leaf_documents=[leaf["documents"] for leaf in leaves],
        leaf_tokens=[leaf["tokens"] for leaf in leaves],
        leaf_sequences=[leaf["sequences"] for leaf in leaves],
        shards=shards,
        num_records=num_records,
        stats=stats,
        element_counts=counts,
        timing_s={"tokenizer": tokenizer_seconds},
    )
