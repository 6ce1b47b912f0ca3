"""The persistent streamed bank: tensorstore zarr3 arrays, one chunk per block, in versions.

Layout under the store's kvstore directory (docs/bank.md):

    manifest.json                 geometry, dtypes, init seed, format version, uid
    generation.json               {"next": first unused generation, "floor": oldest live one}
    versions/<step>.npz           the bank at checkpoint <step>: per level, int32[clusters]
                                  generation holding each block (-1 = never written)
    g<gen>/<level>/<field>/       zarr3 arrays [clusters, *block shape], chunk = 1 block
                                  (or a shard of `blocks_per_shard` blocks, one inner chunk
                                  each); fields params/<m>, mu/<m>, nu/<m>, count
    g<gen>/written.npz            blocks written in <gen> that a kept version still uses

Why generations: a version (a checkpoint's bank) must stay readable while
training goes on and while a later write-back is interrupted by a crash.
Writes only ever go to the current generation, which no saved version
references; sealing it (at a checkpoint) records the block -> generation map
as a new version and opens a fresh generation. Sealed generations are never
written again, so a version is immutable: a crash at any point leaves every
saved version intact and the torn generation unreferenced (it is deleted by
`collect_garbage`). Every chunk carries a crc32c checksum; missing chunks are
read errors (`fill_missing_data_reads` off), never silent zeros. A block
that no generation holds reads as its deterministic initialisation.
"""

from __future__ import annotations

import io
import json
import threading
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import tensorstore as ts

from hmem_jax.bank.exchange import slice_axis
from hmem_jax.bank.geometry import BankGeometry
from hmem_jax.bank.layout import LevelLayout, describe_location, level_layouts
from hmem_jax.bank.materialize import Materializer
from hmem_jax.bank.parts import Box, box_index, box_shape, whole
from hmem_jax.errors import BankCorruptionError, BankMismatchError, BankStoreError
from hmem_jax.paths import check_kvstore

FORMAT_VERSION = 1
UNTOUCHED = -1


def manifest_for(
    geometry: BankGeometry, with_generic: bool, bank_dtype: str, moment_dtype: str, init_seed: int
) -> dict[str, Any]:
    """Everything that fixes the values a block id stands for (compared at open)."""
    return {
        "format_version": FORMAT_VERSION,
        "kind": geometry.kind,
        "branching": geometry.branching,
        "level_sizes": list(geometry.level_sizes),
        "memory_layers": list(geometry.layers),
        "matrices": {
            n: [s if s is not None else "rank" for s in m.shape]
            for n, m in sorted(geometry.matrices.items())
        },
        "bank_dtype": bank_dtype,
        "moment_dtype": moment_dtype,
        "init_seed": init_seed,
        "with_generic": with_generic,
    }


def _codecs(
    block_shape: tuple[int, ...], blocks_per_shard: int, axis: int | None, splits: int
) -> tuple[list[int], list]:
    """(chunk shape, codecs): one (inner) chunk per block, or per 1/`splits` of a block along
    `axis`; crc32c on every chunk."""
    piece = list(block_shape)
    if axis is not None:
        piece[axis] //= splits
    inner = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
    if blocks_per_shard == 1:
        return [1, *piece], inner
    return [blocks_per_shard, *piece], [
        {
            "name": "sharding_indexed",
            "configuration": {"chunk_shape": [1, *piece], "codecs": inner, "index_codecs": inner},
        }
    ]


def _split_axis(block_shape: tuple[int, ...], splits: int) -> int | None:
    """The block axis a store cuts into `splits` chunks: the exchange's rule (the longest
    axis that divides), so chunks line up with the devices' slices."""
    axis = slice_axis((1, *block_shape), splits)
    return None if axis is None else axis - 1


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


class BankStore:
    """Blocks of every level in a tensorstore kvstore, read and written by id, in versions.

    Thread-safe: the prefetcher reads, the write-back thread writes and the
    training loop seals versions concurrently.
    """

    def __init__(
        self,
        spec: Mapping[str, Any],
        geometry: BankGeometry,
        with_generic: bool,
        bank_dtype: str,
        moment_dtype: str,
        init_seed: int,
        blocks_per_shard: int = 1,
        create: bool = True,
        writer: bool = True,
        splits: int = 1,
        recover_uid: str = "",
    ) -> None:
        """Open (or, with `create`, start) the bank at `spec`. `recover_uid` rewrites a lost
        manifest of a store that holds data, after checking its arrays fit this layout."""
        self.spec = dict(spec)
        self.where = describe_location(self.spec)
        self.geometry = geometry
        self.layouts: dict[str, LevelLayout] = level_layouts(
            geometry, with_generic, bank_dtype, moment_dtype
        )
        self._context = ts.Context()
        try:
            self._kv = ts.KvStore.open(self.spec, context=self._context).result()
        except ValueError as err:  # tensorstore's word for a spec it cannot open
            raise BankStoreError(
                f"The bank store {self.where} cannot be opened ({err}); check "
                "MemoryConfig.bank_store (or --store): a local path, a kvstore URL or a JSON "
                "kvstore spec."
            ) from err
        check_kvstore(self.spec, self.where)  # an object store: reachable, bucket, credentials
        self._lock = threading.RLock()
        self._arrays: dict[tuple, ts.TensorStore] = {}
        self._materializer = Materializer(geometry, init_seed)
        expected = manifest_for(geometry, with_generic, bank_dtype, moment_dtype, init_seed)
        found = self._read_json("manifest.json")
        if found is None:
            holds_data = self._holds_data()
            if holds_data and not recover_uid:
                raise BankStoreError(
                    f"The store at {self.where} holds bank data but no manifest.json (deleted, "
                    "or the store is damaged); nothing was written to it. Restore manifest.json "
                    "from a copy of the bank, or rewrite it for the run's configuration with "
                    "`python -m hmem_jax.main.bank create --store=... --gin_file=RUN/config.gin "
                    "--recover_uid=UID`, UID being the bank_uid in the run's checkpoint record "
                    "(RUN/checkpoints/<step>/record/metadata)."
                )
            if not create and not recover_uid:
                raise BankStoreError(
                    f"No bank at {self.where} (manifest.json is missing). "
                    "Create it first (python -m hmem_jax.main.bank create)."
                )
            found = {
                **expected,
                "blocks_per_shard": int(blocks_per_shard),
                "splits": int(splits),
                "uid": recover_uid or uuid.uuid4().hex,
            }
            if holds_data:
                self._check_arrays_fit(found)
            self._write_json("manifest.json", found)
        self._check_manifest(found, expected)
        self.manifest = found
        self.uid: str = found["uid"]
        self.blocks_per_shard = int(found["blocks_per_shard"])
        self.splits = int(found.get("splits", 1))
        self.split_axes = self._split_axes()
        self.gen_map: dict[str, np.ndarray] = {
            k: np.full(l.clusters, UNTOUCHED, np.int32) for k, l in self.layouts.items()
        }
        self.version: int | None = None
        self.current_gen = self._start_generation() if writer else -1
        self._written_now: dict[str, set[int]] = {k: set() for k in self.layouts}

    # ----- manifest and small files ---------------------------------------------------------

    def _read_bytes(self, key: str) -> bytes | None:
        result = self._kv.read(key).result()
        return bytes(result.value) if result.state == "value" else None

    def _read_json(self, key: str) -> Any:
        raw = self._read_bytes(key)
        return None if raw is None else json.loads(raw)

    def _write_json(self, key: str, value: Any) -> None:
        self._kv.write(key, json.dumps(value, indent=1, sort_keys=True).encode()).result()

    def _check_manifest(self, found: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
        diffs = [
            f"{k}: store has {found.get(k)!r}, this run has {v!r}"
            for k, v in expected.items()
            if found.get(k) != v
        ]
        if diffs:
            raise BankMismatchError(
                f"The bank at {self.where} was created for a different bank than this run's "
                f"MemoryConfig/ModelConfig/HierarchyConfig ({'; '.join(diffs)}). Use the "
                "configuration it was created with, or point MemoryConfig.bank_store at a new "
                "location."
            )

    def _split_axes(self) -> dict[str, dict[str, int | None]]:
        return {
            key: {f: _split_axis(shape, self.splits) for f, (shape, _) in layout.fields.items()}
            for key, layout in self.layouts.items()
        }

    def _holds_data(self) -> bool:
        """Whether anything but a manifest was ever written here (a writer claims a generation
        before its first block)."""
        return self._read_bytes("generation.json") is not None or bool(self.versions())

    def _check_arrays_fit(self, manifest: Mapping[str, Any]) -> None:
        """A manifest rewritten for a store that holds data must describe its arrays: open the
        newest version's arrays with the layout the manifest implies (tensorstore compares)."""
        self.blocks_per_shard = int(manifest["blocks_per_shard"])
        self.splits = int(manifest["splits"])
        self.split_axes = self._split_axes()
        versions = self.versions()
        if not versions:
            return
        maps = self.load_version_map(versions[-1])
        for key, gens in maps.items():
            for gen in np.unique(gens[gens != UNTOUCHED]):
                for field in self.layouts[key].fields:
                    try:
                        ts.open(
                            self._array_spec(int(gen), key, field), context=self._context, open=True
                        ).result()
                    except ValueError as err:
                        raise BankMismatchError(
                            f"The store at {self.where} does not hold the bank this "
                            f"configuration describes ({key} {field}: {err}); give the run's own "
                            "gin config (RUN/config.gin). Nothing was written."
                        ) from err

    def _start_generation(self) -> int:
        """Claim a generation no earlier process has written to (torn writes stay unreferenced)."""
        state = self._read_json("generation.json") or {"next": 0, "floor": 0}
        gen = int(state["next"])
        self._write_json("generation.json", {**state, "next": gen + 1})
        return gen

    # ----- arrays ----------------------------------------------------------------------------

    def _array_spec(
        self, gen: int, key: str, field: str, keep_fill_chunks: bool = True
    ) -> dict[str, Any]:
        layout = self.layouts[key]
        shape, dtype = layout.fields[field]
        chunk, codecs = _codecs(
            shape, self.blocks_per_shard, self.split_axes[key][field], self.splits
        )
        path = f"{self.spec.get('path', '')}g{gen:08d}/{key}/{field}/"
        return {
            "driver": "zarr3",
            "kvstore": {**self.spec, "path": path},
            "metadata": {
                "shape": [layout.clusters, *shape],
                "data_type": dtype.name,
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
                "codecs": codecs,
            },
            # A missing chunk is an error, never silent zeros; an all-zero block (a zero-
            # initialised matrix, fresh moments) is still stored.
            "fill_missing_data_reads": False,
            "store_data_equal_to_fill_value": keep_fill_chunks,
        }

    def _array(self, gen: int, key: str, field: str, write: bool) -> ts.TensorStore:
        """The zarr3 array of one field of one level in generation `gen` (handles are cached)."""
        handle = (gen, key, field, write)
        with self._lock:
            if handle in self._arrays:
                return self._arrays[handle]
        spec = self._array_spec(gen, key, field)
        try:
            array = ts.open(spec, context=self._context, open=True, create=write).result()
        except ValueError as err:
            raise BankCorruptionError(
                f"Generation {gen} of level {key} ({field}) at {self.where} cannot be opened "
                f"({err}). The bank version {self.version} references it; the store is damaged: "
                "restore it from a copy, or resume from an older checkpoint."
            ) from err
        with self._lock:
            self._arrays[handle] = array
        return array

    def read(
        self, key: str, ids: np.ndarray, boxes: Mapping[str, Box] | None = None
    ) -> dict[str, np.ndarray]:
        """field -> [len(ids), ...]: the current value of blocks `ids` (all < clusters), or of
        the part `boxes[field]` of each block (a process's part, `bank/parts.py`)."""
        layout = self.layouts[key]
        ids = np.asarray(ids, np.int64)
        with self._lock:
            gens = self.gen_map[key][ids].copy()
        boxes = {f: boxes[f] if boxes else whole(shape) for f, (shape, _) in layout.fields.items()}
        out = {
            f: np.zeros((len(ids),) + box_shape(boxes[f]), dtype)
            for f, (_, dtype) in layout.fields.items()
        }
        fresh = gens == UNTOUCHED
        if fresh.any():
            init = self._materializer.rows(layout, ids[fresh])
            for field, value in init.items():
                out[field][fresh] = value[(slice(None),) + box_index(boxes[field])]
        # One copy per block, straight into `out`: tensorstore decodes each chunk into the
        # numpy-backed destination (an index-array read, then a copy, was 1.5x slower).
        reads = []
        for gen in np.unique(gens[~fresh]):
            where = np.nonzero(gens == gen)[0]
            for field in layout.fields:
                array = self._array(int(gen), key, field, write=False)
                dest = ts.array(out[field], copy=False, write=True)
                part = box_index(boxes[field])
                futures = [dest[int(slot)].write(array[(int(ids[slot]),) + part]) for slot in where]
                reads.append((where, field, int(gen), futures))
        for where, field, gen, futures in reads:
            try:
                for future in futures:
                    future.result()
            except ValueError as err:
                raise BankCorruptionError(
                    f"Blocks {ids[where].tolist()} of level {key} ({field}, generation {gen}) at "
                    f"{self.where} cannot be read: {err}. The store is damaged: restore it from "
                    "a copy, or resume from an older checkpoint whose version does not use "
                    "these blocks."
                ) from err
        return out

    def write(
        self, key: str, ids: np.ndarray, rows: Mapping[str, np.ndarray], mark: bool = True
    ) -> None:
        """Store whole rows of blocks `ids` (sorted, unique) in the current generation; durable
        on return. `mark=False` leaves the block map as it was (see `write_pieces`)."""
        layout = self.layouts[key]
        self.write_pieces(
            key, [(f, ids, rows[f], whole(layout.fields[f][0])) for f in layout.fields]
        )
        if mark:
            self.mark_written(key, ids)

    def write_pieces(
        self, key: str, pieces: Iterable[tuple[str, np.ndarray, np.ndarray, Box]]
    ) -> None:
        """Store (field, ids, values [len(ids), *box], box) pieces in the current generation;
        durable on return. The block map is not changed: the caller publishes the writes with
        `mark_written` (on every process of a multi-process run, once every process's writes
        are known to have returned)."""
        if self.current_gen < 0:
            raise BankStoreError(f"The bank at {self.where} was opened read-only.")
        futures = []
        for field, ids, values, box in pieces:
            ids = np.asarray(ids, np.int64)
            if len(ids):
                array = self._array(self.current_gen, key, field, write=True)
                futures.append(array[(ids,) + box_index(box)].write(np.ascontiguousarray(values)))
        for future in futures:
            future.result()

    def mark_written(self, key: str, ids: np.ndarray) -> None:
        """Blocks `ids` now live in the current generation (their write has returned)."""
        with self._lock:
            self.gen_map[key][np.asarray(ids, np.int64)] = self.current_gen
            self._written_now[key].update(int(i) for i in ids)

    # ----- versions ----------------------------------------------------------------------------

    def versions(self) -> list[int]:
        """Steps of the saved versions, ascending."""
        keys = self._kv.list(ts.KvStore.KeyRange("versions/", "versions0")).result()
        return sorted(int(k.decode()[len("versions/") : -len(".npz")]) for k in keys)

    def _version_key(self, step: int) -> str:
        return f"versions/{step:012d}.npz"

    def seal(self, step: int, claim: bool = True) -> int:
        """Save the bank as it is now (all writes returned) as version `step`; open a new
        generation and return its number.

        In a multi-process run only process 0 writes (`claim=True`), after every
        process's write-backs have returned; the others call it with
        `claim=False` and then `use_generation` with process 0's number.
        """
        with self._lock:
            gen_map = {k: v.copy() for k, v in self.gen_map.items()}
            written = {k: np.array(sorted(v), np.int32) for k, v in self._written_now.items()}
            sealed = self.current_gen
        new_gen = -1
        if claim:
            if any(len(v) for v in written.values()):
                self._kv.write(f"g{sealed:08d}/written.npz", _npz_bytes(written)).result()
            self._kv.write(
                self._version_key(step), _npz_bytes({**gen_map, "__gen__": np.array(sealed)})
            ).result()
            new_gen = self._start_generation()
        with self._lock:
            self.current_gen, self.version = new_gen, step
            self._written_now = {k: set() for k in self.layouts}
        return new_gen

    def use_generation(self, gen: int) -> None:
        """Write into generation `gen` (claimed by process 0 of a multi-process run)."""
        with self._lock:
            self.current_gen = int(gen)

    def load_version_map(self, step: int) -> dict[str, np.ndarray]:
        raw = self._read_bytes(self._version_key(step))
        if raw is None:
            raise BankCorruptionError(
                f"Bank version {step} is missing from {self.where} (versions/ holds "
                f"{self.versions()}). The checkpoint names a bank this store does not hold: point "
                "MemoryConfig.bank_store at the run's bank, or start a fresh run."
            )
        with np.load(io.BytesIO(raw)) as data:
            maps = {k: data[k] for k in self.layouts}
        for key, layout in self.layouts.items():
            if maps[key].shape != (layout.clusters,):
                raise BankCorruptionError(
                    f"Bank version {step} at {self.where} has a map of "
                    f"shape {maps[key].shape} for level {key}, expected "
                    f"({layout.clusters},)."
                )
        return maps

    def restore(self, step: int) -> None:
        """Make version `step` the current bank (new writes go to a fresh generation)."""
        maps = self.load_version_map(step)
        with self._lock:
            self.gen_map, self.version = maps, step
            self._written_now = {k: set() for k in self.layouts}

    def touched(self, key: str) -> np.ndarray:
        """bool[clusters]: blocks that hold a written value (others read as their init)."""
        with self._lock:
            return self.gen_map[key] != UNTOUCHED

    # ----- garbage collection ------------------------------------------------------------

    def collect_garbage(self, keep: Iterable[int]) -> dict[str, int]:
        """Drop versions not in `keep` and every stored block no kept version (nor the live
        bank) uses; returns counts. Safe to interrupt: it deletes only unreferenced data."""
        keep = set(int(s) for s in keep)
        live: dict[int, dict[str, set[int]]] = {}

        def mark(maps: Mapping[str, np.ndarray]) -> None:
            for key in self.layouts:
                for gen in np.unique(maps[key][maps[key] != UNTOUCHED]):
                    ids = np.nonzero(maps[key] == gen)[0]
                    live.setdefault(int(gen), {}).setdefault(key, set()).update(ids.tolist())

        dropped = 0
        for step in self.versions():
            if step in keep:
                mark(self.load_version_map(step))
            else:
                self._kv.delete_range(
                    ts.KvStore.KeyRange(self._version_key(step), self._version_key(step) + "\0")
                ).result()
                dropped += 1
        with self._lock:
            mark(self.gen_map)
            current = self.current_gen
        state = self._read_json("generation.json") or {"next": current + 1, "floor": 0}
        deleted_gens = freed_blocks = 0
        for gen in range(int(state.get("floor", 0)), current):
            prefix = f"g{gen:08d}/"
            if gen not in live:
                self._kv.delete_range(ts.KvStore.KeyRange(prefix, f"g{gen:08d}0")).result()
                deleted_gens += 1
                continue
            raw = self._read_bytes(prefix + "written.npz")
            if raw is None:
                continue
            with np.load(io.BytesIO(raw)) as data:
                written = {k: data[k] for k in data.files}
            kept = {}
            for key, ids in written.items():
                dead = np.setdiff1d(ids, np.array(sorted(live[gen].get(key, ())), np.int32))
                kept[key] = np.setdiff1d(ids, dead)
                if len(dead):
                    self._erase(gen, key, dead)
                    freed_blocks += len(dead)
            if freed_blocks:
                self._kv.write(prefix + "written.npz", _npz_bytes(kept)).result()
        floor = min([g for g in live if g < current] + [current])
        self._write_json(
            "generation.json", {"next": max(int(state["next"]), current + 1), "floor": floor}
        )
        return {
            "versions_dropped": dropped,
            "generations_deleted": deleted_gens,
            "blocks_freed": freed_blocks,
        }

    def _erase(self, gen: int, key: str, ids: np.ndarray) -> None:
        """Delete stored blocks: writing the fill value with fill-elision on removes the chunks."""
        layout = self.layouts[key]
        for field, (shape, dtype) in layout.fields.items():
            eraser = ts.open(
                self._array_spec(gen, key, field, keep_fill_chunks=False),
                context=self._context,
                open=True,
            ).result()
            eraser[np.asarray(ids, np.int64)].write(np.zeros((len(ids),) + shape, dtype)).result()

    def close(self) -> None:
        with self._lock:
            self._arrays.clear()
