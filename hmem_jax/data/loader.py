"""The training data loader: batch(step) is a pure function of (seed, step).

Why (docs/design.md decision 8): resume is a jump and every process agrees on every batch.

Order: the records of a prepared directory are globally shuffled by grain's
index shuffle (`grain.MapDataset.range(N).shuffle(seed)`, a Feistel
permutation, O(1) memory at any N); global row g of the stream is element g of
that dataset, so epoch e = g // N gets its own permutation. Step s holds global
rows [s*B, (s+1)*B). Nothing depends on what was read before, so resuming at
step s is a jump, and any number of processes see the same global batches:
process p of P reads only rows [p*B/P, (p+1)*B/P) of each step's batch.

Per-step memory blocks (docs/design.md decision 3). The global batch is split into S batch
shards (shard s = global rows [s*B/S, (s+1)*B/S), the rows of one position of
the mesh's batch axes; a process holds whole shards). Every process computes,
from the small per-record leaf table (no record reads), the cluster path of
the sequences and, per level, its shards' block ids, each sequence's slot and
the global batch's union: the keys of `data/batch.py`, which defines every
array of a batch. A level's capacity defaults to min(B/S, clusters at level
l), so shapes never change and the step never recompiles; padding is the
level's block count (`loader.block_id_padding[l-1]`).

Each batch holds b = B / P local rows of T = seq_len tokens. `iterate(start_step)`
prefetches `prefetch` steps ahead with `worker_count` (at least 1) background
threads: record reads and numpy assembly release the GIL, and threads need none
of the absl set-up that grain's worker processes require.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from hmem_jax.data import batch as schema
from hmem_jax.data import prepared
from hmem_jax.data.tokenizer import Tokenizer, load_tokenizer
from hmem_jax.errors import ConfigError, DataMismatchError, PreparedDataError

_FINGERPRINT_KEYS = (
    "format_version",
    "seq_len",
    "num_records",
    "tokenizer_sha256",
    "tree_hash",
    "source",
    "subtree",
)


def _shuffle_seed(seed: int) -> int:
    """A well-mixed 32-bit seed: grain seeds epoch e with seed + e, so raw seeds s and s+1
    would share all but one epoch's order; mixing makes neighbouring seeds unrelated."""
    value = (int(seed) * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
    value ^= value >> 29
    value = (value * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return int((value ^ (value >> 32)) & 0x7FFFFFFF)


def positions_from_segments(segment_ids: np.ndarray) -> np.ndarray:
    """int32[b, T]: index within the segment, restarting where the id changes; 0 on padding."""
    length = segment_ids.shape[-1]
    index = np.broadcast_to(np.arange(length, dtype=np.int32), segment_ids.shape)
    boundary = np.ones(segment_ids.shape, dtype=bool)
    boundary[..., 1:] = segment_ids[..., 1:] != segment_ids[..., :-1]
    starts = np.maximum.accumulate(np.where(boundary, index, 0), axis=-1)
    return np.where(segment_ids > 0, index - starts, 0).astype(np.int32)


def shard_blocks(
    block_ids: np.ndarray,
    shards: int,
    capacity: int,
    padding: int,
    level: int = 0,
    listed: range | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One level's blocks of a global batch, per batch shard (see the module doc).

    block_ids: int[B], each sequence's block at the level; shards: S, dividing B;
    capacity: the static length of a shard's list; padding: the level's block
    count; listed: the shards to list (a process's own; default all S). Returns
    (ids int32[len(listed), capacity], slots int32[rows of the listed shards] into
    their own shard's row, union int32[min(S * capacity, padding)] the whole
    batch's distinct ids).
    """
    listed = range(shards) if listed is None else listed
    per_shard = len(block_ids) // shards
    ids = np.full((len(listed), capacity), padding, dtype=np.int32)
    slots = np.empty(len(listed) * per_shard, dtype=np.int32)
    for row, shard in enumerate(listed):
        mine = block_ids[shard * per_shard : (shard + 1) * per_shard]
        unique, inverse = np.unique(mine, return_inverse=True)
        slots[row * per_shard : (row + 1) * per_shard] = inverse
        if len(unique) > capacity:
            raise ValueError(
                f"Batch shard {shard} of the step has {len(unique)} distinct level-{level} blocks "
                f"but block_capacity is {capacity}; raise block_capacity (or leave it None)."
            )
        ids[row, : len(unique)] = unique
    distinct = np.unique(block_ids)
    union = np.full(min(shards * capacity, padding), padding, dtype=np.int32)
    union[: len(distinct)] = distinct
    return ids, slots, union


class Loader:
    """Deterministic, resumable, per-process batches of a prepared directory.

    Args:
      prepared_dir: the output of `prepare` (`manifest.json` and shards).
      global_batch_size: B, sequences per step over all processes.
      seq_len: must equal the prepared seq_len (checked).
      seed: the shuffle seed.
      process_index, process_count: this process reads rows [p*B/P, (p+1)*B/P).
      batch_shards: S, how many ways the step's batch is split over the mesh (a
        multiple of process_count, dividing B; default one per process); blocks are
        listed per shard.
      block_capacity: static length of a shard's `block_ids_l{l}` row; an int for
        every level, a sequence per level, or None for min(B/S, clusters there).
      expect: a `fingerprint` saved by an earlier run (e.g. in its checkpoint);
        any difference (tokenizer, tree, records, seq_len, source) is an error.
      tree_hash: the content hash of the tree the run's memory bank follows;
        it must be the tree the data was routed with.
      worker_count, prefetch: background threads and steps read ahead by `iterate`.
      subtree: read only the records of this level-1 cluster (the paper's
        subtree-parallel training: one job per level-1 subtree); None = all.
    """

    def __init__(
        self,
        prepared_dir: str,
        global_batch_size: int,
        seq_len: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        batch_shards: int | None = None,
        block_capacity: int | Sequence[int] | None = None,
        expect: Mapping[str, Any] | None = None,
        tree_hash: str | None = None,
        worker_count: int = 1,
        prefetch: int = 2,
        subtree: int | None = None,
    ) -> None:
        self.prepared_dir = prepared_dir
        self.subtree = subtree
        self.manifest = prepared.read_manifest(prepared_dir)
        self._check_arguments(global_batch_size, seq_len, process_index, process_count)
        batch_shards = process_count if batch_shards is None else batch_shards
        self._check_shards(global_batch_size, process_count, batch_shards)
        self.batch_shards = batch_shards
        self.shard_size = global_batch_size // batch_shards
        self.global_batch_size = global_batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.process_index = process_index
        self.process_count = process_count
        self.local_batch_size = global_batch_size // process_count
        self.worker_count = max(1, worker_count)
        self.prefetch = max(1, prefetch)
        self.tokenizer: Tokenizer = load_tokenizer(prepared_dir)
        if expect is not None:
            self._check_fingerprint(expect)
        self._check_tree_hash(tree_hash)

        self._token_dtype = np.dtype(self.manifest["token_dtype"])
        self._segment_dtype = np.dtype(self.manifest["segment_dtype"])
        self._token_bytes = seq_len * self._token_dtype.itemsize
        self.num_records = int(self.manifest["num_records"])
        shard_paths = [os.path.join(prepared_dir, s["file"]) for s in self.manifest["shards"]]
        self._source = grain.sources.ArrayRecordDataSource(shard_paths)
        if len(self._source) != self.num_records:
            raise PreparedDataError(
                f"The shards in {prepared_dir!r} hold {len(self._source)} records but the "
                f"manifest lists {self.num_records}; the directory is damaged. Prepare it again."
            )
        self._record_leaves = np.fromfile(
            os.path.join(prepared_dir, prepared.RECORD_LEAVES_FILE), dtype="<i4"
        )
        tree = self.manifest["tree"]
        self.depth = int(tree["depth"]) if tree else 0
        if tree:
            self._leaf_paths = np.load(os.path.join(prepared_dir, prepared.LEAF_PATHS_FILE))
            self._leaf_block_ids = np.load(os.path.join(prepared_dir, prepared.LEAF_BLOCK_IDS_FILE))
            self.block_id_padding = [int(n) for n in tree["clusters_per_level"]]
            self.block_capacity = self._capacities(block_capacity)
        else:
            self.block_id_padding, self.block_capacity = [], []
        self._records = self._subtree_records(subtree)  # None: every record, in order
        count = self.num_records if self._records is None else len(self._records)
        self._order = grain.MapDataset.range(count).shuffle(seed=_shuffle_seed(seed))

    # ----- validation ---------------------------------------------------------------------
    def _check_arguments(self, batch: int, seq_len: int, index: int, count: int) -> None:
        prepared = int(self.manifest["seq_len"])
        if seq_len != prepared:
            raise DataMismatchError(
                f"TrainConfig.seq_len = {seq_len} but {self.prepared_dir!r} was prepared with "
                f"seq_len = {prepared}. Set TrainConfig.seq_len = {prepared}, or prepare the data "
                "again with the new length into another directory."
            )
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"process_index = {index} must be in [0, process_count = {count}).")
        if batch < 1 or batch % count:
            raise ConfigError(
                f"The global batch size {batch} must be a positive multiple of the "
                f"process count {count}; change TrainConfig.batch_size."
            )

    @staticmethod
    def _check_shards(batch: int, processes: int, shards: int) -> None:
        if shards < 1 or shards % processes or batch % shards:
            raise ConfigError(
                f"The batch is split into {shards} shards over {processes} process(es): the "
                f"shard count must be a multiple of the process count and divide the global "
                f"batch size {batch}; change TrainConfig.batch_size or MeshConfig."
            )

    def _subtree_records(self, subtree: int | None) -> np.ndarray | None:
        if subtree is None:
            return None
        if not self.depth:
            raise DataMismatchError(
                f"A subtree job (subtree {subtree}) needs data routed by a "
                f"tree; {self.prepared_dir!r} was prepared without one."
            )
        branching = self.block_id_padding[0]
        if not 0 <= subtree < branching:
            raise ConfigError(
                f"TrainConfig.subtree = {subtree} is not a level-1 cluster of the tree "
                f"{self.prepared_dir!r} was routed with; choose one of 0 .. {branching - 1}."
            )
        records = np.flatnonzero(self._leaf_paths[self._record_leaves, 0] == subtree)
        if not len(records):
            raise DataMismatchError(
                f"Level-1 subtree {subtree} holds no records in "
                f"{self.prepared_dir!r}; there is nothing to train on."
            )
        return records

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What a run must keep seeing on resume; store it in the checkpoint, pass as `expect`."""
        tree = self.manifest["tree"]
        found = {
            "format_version": self.manifest["format_version"],
            "seq_len": self.seq_len,
            "num_records": int(self.manifest["num_records"]),
            "tokenizer_sha256": self.manifest["tokenizer"]["sha256"],
            "tree_hash": tree["content_hash"] if tree else None,
            "source": self.manifest["source"],
        }
        if self.subtree is not None:  # absent otherwise: earlier checkpoints still match
            found["subtree"] = self.subtree
        return found

    def _check_fingerprint(self, expect: Mapping[str, Any]) -> None:
        found = self.fingerprint
        differences = [
            f"{key}: the run started with {expect.get(key)!r}, the data now has {found.get(key)!r}"
            for key in _FINGERPRINT_KEYS
            if (key in expect or key in found) and expect.get(key) != found.get(key)
        ]
        if differences:
            raise DataMismatchError(
                f"The prepared data in {self.prepared_dir!r} is not the data this run was "
                "trained on:\n  " + "\n  ".join(differences) + "\nResume with the original "
                "prepared directory (DataConfig.prepared_dir), or start a new workdir."
            )

    def _check_tree_hash(self, tree_hash: str | None) -> None:
        if tree_hash is None:
            return
        tree = self.manifest["tree"]
        routed = tree["content_hash"] if tree else None
        if routed != tree_hash:
            raise DataMismatchError(
                f"The run's cluster tree has content hash {tree_hash!r} but {self.prepared_dir!r} "
                f"was routed with {routed!r}. Prepare the data with this tree "
                "(`python -m hmem_jax.main.prepare --tree=DIR`), or use the tree it was made with."
            )

    def _capacities(self, block_capacity: int | Sequence[int] | None) -> list[int]:
        natural = [min(self.shard_size, n) for n in self.block_id_padding]
        if block_capacity is None:
            return natural
        given = (
            [int(block_capacity)] * self.depth
            if isinstance(block_capacity, int)
            else [int(c) for c in block_capacity]
        )
        if len(given) != self.depth or any(c < 1 for c in given):
            raise ValueError(
                f"block_capacity = {block_capacity!r} must be a positive int or "
                f"{self.depth} positive ints (one per level)."
            )
        return [min(c, n) for c, n in zip(given, natural)]

    # ----- batches --------------------------------------------------------------------------
    def record_indices(self, step: int) -> np.ndarray:
        """int64[B]: the record read by each global row of `step` (all processes)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}.")
        first = step * self.global_batch_size
        rows = np.fromiter(
            (self._order[g] for g in range(first, first + self.global_batch_size)),
            dtype=np.int64,
            count=self.global_batch_size,
        )
        return rows if self._records is None else self._records[rows]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's slice of global batch `step`; the same arrays every time it is asked."""
        records = self.record_indices(step)
        local = slice(
            self.process_index * self.local_batch_size,
            (self.process_index + 1) * self.local_batch_size,
        )
        raw = self._source.__getitems__([int(r) for r in records[local]])
        buffer = np.frombuffer(b"".join(raw), dtype=np.uint8).reshape(len(raw), -1)
        tokens = buffer[:, : self._token_bytes].view(self._token_dtype).astype(np.int32)
        segment_ids = buffer[:, self._token_bytes :].view(self._segment_dtype).astype(np.int32)
        batch = {
            schema.TOKENS: tokens,
            schema.SEGMENT_IDS: segment_ids,
            schema.POSITIONS: positions_from_segments(segment_ids),
        }
        if self.depth:
            batch.update(self._blocks(records, local))
        return batch

    def _blocks(self, records: np.ndarray, local: slice) -> dict[str, np.ndarray]:
        leaves = self._record_leaves[records]
        block_ids = self._leaf_block_ids[leaves]  # [B, depth], global batch
        arrays = {schema.PATHS: self._leaf_paths[leaves[local]].astype(np.int32)}
        own = range(local.start // self.shard_size, local.stop // self.shard_size)
        for level in range(1, self.depth + 1):
            ids, slots, union = shard_blocks(
                block_ids[:, level - 1],
                self.batch_shards,
                self.block_capacity[level - 1],
                self.block_id_padding[level - 1],
                level,
                own,
            )
            arrays[schema.block_ids_key(level)] = ids
            arrays[schema.block_slots_key(level)] = slots
            arrays[schema.block_union_key(level)] = union
        return arrays

    def iterate(self, start_step: int = 0) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(step, batch) from `start_step` on, forever, read `prefetch` steps ahead."""
        executor = concurrent.futures.ThreadPoolExecutor(
            self.worker_count, thread_name_prefix="hmem-loader"
        )
        pending: list[tuple[int, concurrent.futures.Future]] = []
        next_step = start_step
        try:
            while True:
                while len(pending) < self.prefetch + 1:
                    pending.append((next_step, executor.submit(self.batch, next_step)))
                    next_step += 1
                step, future = pending.pop(0)
                yield step, future.result()
        finally:
            for _, future in pending:
                future.cancel()
            executor.shutdown(wait=False, cancel_futures=True)
