"""The streamed bank tier: fetch(ids) and commit(rows) over a tensorstore store + host cache.

Per training step t (hmem_jax/train/loop.py):
1. `prefetch(ids of t+1 .. t+k)` before dispatching step t: a reader thread
   loads the blocks not in the cache from the store (or materialises their
   initialisation) while step t computes;
2. `fetch(ids of t)` assembles the step's rows (params, moments, counts) from
   the cache, waiting only for reads not yet done;
3. `commit(rows out of t, ids of t+1 .. t+k)` puts the updated rows in the
   cache as dirty, so step t+1 reads them from there: an update is visible to
   the next fetch without waiting for any write. Dirty blocks not needed by
   the next steps are written back by a writer thread; the ones still needed
   stay dirty (written at the next checkpoint or once they fall out of the
   window), so a level-1 block used every step is not rewritten every step.
4. `snapshot(step)` at a checkpoint writes every dirty block and seals a
   store version (hmem_jax/bank/store.py) that the orbax checkpoint records.

Multi-process runs (docs/bank.md): a process caches, reads and writes only
its own part of each block (the slices its devices hold, `bank/parts.py`),
so processes never hold two versions of one value. Every process sees the
same step ids and so holds the same dirty set; each writes its own pieces.
Writes scheduled at commit t are published (block map updated, cache entries
made evictable) on every process at commit t+1 after a barrier, so no
process drops a block before all its pieces are stored.
"""

from __future__ import annotations

import concurrent.futures
import functools
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hmem_jax.bank import device as bank_lib
from hmem_jax.bank.cache import BlockCache, Key
from hmem_jax.bank.host_memory import return_freed_blocks_to_os
from hmem_jax.bank.layout import COUNT
from hmem_jax.bank.parts import FieldPart, box_index, box_shape, process_parts, single_process_parts
from hmem_jax.bank.store import BankStore

StepIds = Mapping[str, np.ndarray]  # level key -> int32[U] ids (>= clusters: padding)


def _barrier(name: str, process_count: int) -> None:
    if process_count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _agree(value: int, process_count: int) -> int:
    """Process 0's value on every process."""
    if process_count == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def to_level_bank(rows: Mapping[str, Any]) -> bank_lib.LevelBank:
    """field -> [U, ...] arrays (host or device) as a LevelBank (the step's input/output
    layout)."""
    tree: dict[str, dict[str, Any]] = {"params": {}, "mu": {}, "nu": {}}
    for field, value in rows.items():
        if field != COUNT:
            kind, name = field.split("/", 1)
            tree[kind][name] = value
    return bank_lib.LevelBank(
        params=tree["params"], mu=tree["mu"], nu=tree["nu"], count=rows[COUNT]
    )


def from_level_bank(bank: bank_lib.LevelBank, convert: Any = np.asarray) -> dict[str, Any]:
    """A LevelBank as field -> [U, ...] (host arrays, or the leaves as they are: convert=None)."""
    convert = convert or (lambda x: x)
    rows = {
        f"{kind}/{name}": convert(value)
        for kind in ("params", "mu", "nu")
        for name, value in getattr(bank, kind).items()
    }
    rows[COUNT] = convert(bank.count)
    return rows


class StreamedBank:
    """fetch / commit / snapshot of a streamed bank for a training loop (see module doc)."""

    def __init__(
        self,
        store: BankStore,
        cache_bytes: int,
        prefetch_steps: int,
        process_index: int = 0,
        process_count: int = 1,
        parts: Mapping[str, Mapping[str, FieldPart]] | None = None,
    ) -> None:
        self.store = store
        self.parts = parts if parts is not None else single_process_parts(store)
        self._boxes = {
            key: {f: part.held for f, part in fields.items()} for key, fields in self.parts.items()
        }
        self.cache = BlockCache(cache_bytes)
        self.prefetch_steps = prefetch_steps
        self.process_index, self.process_count = process_index, process_count
        self._reader = concurrent.futures.ThreadPoolExecutor(1, "hmem-bank-read")
        self._writer = concurrent.futures.ThreadPoolExecutor(1, "hmem-bank-write")
        self._pending: dict[Key, concurrent.futures.Future] = {}
        self._pending_lock = threading.Lock()
        self._in_flight: list[concurrent.futures.Future] = []
        self._to_publish: list[tuple[str, np.ndarray, list[int]]] = []  # (level, ids, epochs)
        self._counters = dict(hits=0, lookups=0, read_bytes=0, write_bytes=0, wait_s=0.0)

    # ----- reads ---------------------------------------------------------------------------

    def _valid(self, key: str, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids)
        return np.unique(ids[ids < self.store.layouts[key].clusters]).astype(np.int64)

    def _read_into_cache(
        self, key: str, ids: np.ndarray, epochs: Sequence[int]
    ) -> dict[str, np.ndarray]:
        rows = self.store.read(key, ids, self._boxes[key])
        self._counters["read_bytes"] += sum(v.nbytes for v in rows.values())
        for i, (block, epoch) in enumerate(zip(ids, epochs)):
            self.cache.insert_read((key, int(block)), {f: v[i] for f, v in rows.items()}, epoch)
        return rows

    def prefetch(self, upcoming: Sequence[StepIds]) -> None:
        """Start loading the blocks of the next steps that are neither cached nor being read."""
        for step_ids in upcoming:
            for key, ids in step_ids.items():
                with self._pending_lock:
                    todo = [
                        int(b)
                        for b in self._valid(key, ids)
                        if (key, int(b)) not in self.cache and (key, int(b)) not in self._pending
                    ]
                    if not todo:
                        continue
                    epochs = [self.cache.epoch((key, b)) for b in todo]
                    future = self._reader.submit(self._read_into_cache, key, np.array(todo), epochs)
                    for b in todo:
                        self._pending[(key, b)] = future
                future.add_done_callback(functools.partial(self._done, key, tuple(todo)))

    def _done(self, key: str, blocks: tuple[int, ...], future: concurrent.futures.Future) -> None:
        with self._pending_lock:
            for b in blocks:
                if self._pending.get((key, b)) is future:
                    del self._pending[(key, b)]

    def fetch(self, step_ids: StepIds) -> dict[str, tuple[np.ndarray, bank_lib.LevelBank]]:
        """level key -> (ids, rows[U, ...]) for a step; padding rows are zeros (never used)."""
        out = {}
        for key, ids in step_ids.items():
            ids = np.asarray(ids, np.int32)
            layout = self.store.layouts[key]
            rows = self.empty_rows(key, len(ids))
            missing: list[tuple[int, int]] = []
            for slot, block in enumerate(ids):
                if block >= layout.clusters:
                    continue
                self._counters["lookups"] += 1
                cached = self.cache.get((key, int(block)))
                if cached is None:
                    missing.append((slot, int(block)))
                    continue
                self._counters["hits"] += 1
                for field, value in cached.items():
                    rows[field][slot] = value
            if missing:
                start = time.perf_counter()
                self._fill_missing(key, rows, missing)
                self._counters["wait_s"] += time.perf_counter() - start
            out[key] = (ids, to_level_bank(rows))
        return out

    def empty_rows(self, key: str, n: int) -> dict[str, np.ndarray]:
        """field -> zeros [n, *this process's part of a block]."""
        return {
            f: np.zeros((n,) + box_shape(self._boxes[key][f]), dtype)
            for f, (_, dtype) in self.store.layouts[key].fields.items()
        }

    def _fill_missing(
        self, key: str, rows: dict[str, np.ndarray], missing: list[tuple[int, int]]
    ) -> None:
        with self._pending_lock:
            waits = {self._pending[(key, b)] for _, b in missing if (key, b) in self._pending}
        for future in waits:
            future.result()
        still = []
        for slot, block in missing:
            cached = self.cache.get((key, block))
            if cached is None:
                still.append((slot, block))
            else:
                for field, value in cached.items():
                    rows[field][slot] = value
        if still:
            # Absent from the cache means not dirty: the store holds the latest value.
            blocks = np.array([b for _, b in still])
            read = self._read_into_cache(
                key, blocks, [self.cache.epoch((key, int(b))) for b in blocks]
            )
            for i, (slot, _) in enumerate(still):
                for field, value in read.items():
                    rows[field][slot] = value[i]

    # ----- updates and write-back -------------------------------------------------------

    def _publish(self) -> None:
        """Make the writes scheduled at the previous commit visible on every process."""
        for future in self._in_flight:
            future.result()
        self._in_flight = []
        if not self._to_publish:
            return
        _barrier("hmem_jax.bank.publish", self.process_count)
        for key, ids, epochs in self._to_publish:
            self.store.mark_written(key, ids)
            for block, epoch in zip(ids, epochs):
                self.cache.mark_clean((key, int(block)), epoch)
        self._to_publish = []

    def _write(self, key: str, pieces: list[tuple[str, np.ndarray, np.ndarray, Any]]) -> None:
        self.store.write_pieces(key, pieces)
        self._counters["write_bytes"] += sum(values.nbytes for _, _, values, _ in pieces)

    def _pieces(
        self, key: str, ids: np.ndarray, rows: Sequence[Mapping[str, np.ndarray]]
    ) -> list[tuple[str, np.ndarray, np.ndarray, Any]]:
        """The store pieces this process writes of blocks `ids` (values `rows`, its parts)."""
        pieces = []
        per_shard = self.store.blocks_per_shard
        for field, part in self.parts[key].items():
            for chunk, holders in part.writes:
                mine = [
                    i
                    for i, b in enumerate(ids)
                    if part.writer(holders, int(b), per_shard) == self.process_index
                ]
                if mine:
                    inner = box_index(chunk, part.held)
                    values = np.stack([rows[i][field][inner] for i in mine])
                    pieces.append((field, ids[mine], values, chunk))
        return pieces

    def _schedule(self, dirty: list[tuple[Key, dict[str, np.ndarray], int]]) -> None:
        by_level: dict[str, list[tuple[int, dict[str, np.ndarray], int]]] = {}
        for (key, block), rows, epoch in dirty:
            by_level.setdefault(key, []).append((block, rows, epoch))
        for key, items in by_level.items():
            items.sort(key=lambda item: item[0])
            ids = np.array([b for b, _, _ in items], np.int64)
            self._to_publish.append((key, ids, [e for _, _, e in items]))
            pieces = self._pieces(key, ids, [r for _, r, _ in items])
            if pieces:
                self._in_flight.append(self._writer.submit(self._write, key, pieces))

    def commit(
        self,
        updated: Mapping[str, tuple[Any, bank_lib.LevelBank]],
        counts_before: Mapping[str, np.ndarray],
        upcoming: Sequence[StepIds] = (),
    ) -> None:
        """Take a step's updated rows (host arrays); write back what the next steps do not use.

        Only rows whose count moved from `counts_before` (the fetched rows'
        counts) are updates: padding rows and an unused generic block come
        back unchanged and are skipped. The cache keeps views of `updated`,
        which must not be modified afterwards (a step's output never is).
        """
        self._publish()
        for key, (ids, bank) in updated.items():
            ids = np.asarray(ids)
            rows = from_level_bank(bank)
            clusters = self.store.layouts[key].clusters
            moved = (ids < clusters) & (rows[COUNT] != np.asarray(counts_before[key]))
            for slot in np.nonzero(moved)[0]:
                self.cache.put_update((key, int(ids[slot])), {f: v[slot] for f, v in rows.items()})
        soon = {
            (key, int(b))
            for step_ids in upcoming
            for key, ids in step_ids.items()
            for b in self._valid(key, ids)
        }
        self._schedule([d for d in self.cache.dirty() if d[0] not in soon])
        if self.cache.evict(protect=soon) and self.process_count == 1:
            # Over budget with dirty blocks: write them now (backpressure), then evict.
            self._publish()
            self._schedule(self.cache.dirty())
            self._publish()
            self.cache.evict(protect=soon)

    def flush(self) -> None:
        """Write every dirty block and publish it (all processes return together)."""
        self._publish()
        self._schedule(self.cache.dirty())
        self._publish()

    def snapshot(self, step: int) -> dict[str, Any]:
        """Seal the bank after step `step` as a store version; what the checkpoint records."""
        self.flush()
        _barrier("hmem_jax.bank.flushed", self.process_count)
        claim = self.process_index == 0
        gen = self.store.seal(step, claim=claim)
        gen = _agree(gen, self.process_count)
        self.store.use_generation(gen)
        return {"bank_version": step, "bank_uid": self.store.uid}

    def restore(self, version: int) -> None:
        self.store.restore(version)

    def metrics(self) -> dict[str, float]:
        """Counters since the last call: cache hit rate, store bytes, fetch wait."""
        c = self._counters
        out = {
            "mem/cache_hit_rate": c["hits"] / max(c["lookups"], 1),
            "mem/store_read_bytes": float(c["read_bytes"]),
            "mem/store_write_bytes": float(c["write_bytes"]),
            "mem/fetch_wait_s": c["wait_s"],
            "mem/cache_bytes": float(self.cache.nbytes),
        }
        self._counters = dict(hits=0, lookups=0, read_bytes=0, write_bytes=0, wait_s=0.0)
        return out

    def close(self) -> None:
        self._reader.shutdown(wait=True, cancel_futures=True)
        for future in self._in_flight:
            future.result()
        self._writer.shutdown(wait=True)
        self.store.close()


def open_streamed_bank(
    spec: Mapping[str, Any],
    plan: Any,
    process_index: int = 0,
    process_count: int = 1,
    exchange: Any = None,
) -> StreamedBank:
    """The streamed bank of a run's MemoryPlan; process 0 creates the store, the others join.

    `exchange` (the step's `BlockExchange`) fixes which part of each block this process
    holds; without it the process holds whole blocks (one process).
    """
    return_freed_blocks_to_os()
    cfg = plan.config

    def open_store(claim: bool) -> BankStore:
        return BankStore(
            spec,
            plan.geometry,
            plan.with_generic,
            cfg.bank_dtype,
            cfg.moment_dtype,
            cfg.init_seed,
            cfg.blocks_per_shard,
            create=claim,
            writer=claim,
            splits=cfg.store_splits or process_count,
        )

    store = open_store(process_index == 0) if process_index == 0 else None
    _barrier("hmem_jax.bank.created", process_count)
    if store is None:
        store = open_store(False)
    store.use_generation(_agree(store.current_gen, process_count))
    parts = None
    if exchange is not None:
        parts = process_parts(
            exchange,
            store.layouts,
            store.split_axes,
            store.splits,
            process_index,
            f"The bank at {store.where}",
        )
    return StreamedBank(
        store, cfg.host_cache_bytes, cfg.prefetch_steps, process_index, process_count, parts
    )
