"""Which part of every block a process of a streamed run holds, reads and writes.

In training every block is split over the devices (`bank/exchange.py`), so a
process's devices hold one range of every block along the block's split axis
(the whole block for leaves the mesh does not split). A streamed bank keeps
exactly that part of each block it uses in the process's host cache and
reads only that part from the store; no process ever holds a whole block it
does not need, and no block value exists in two processes in two versions,
so multi-process runs need no cache coherence at all (docs/bank.md).

Writes go by store chunk: the store cuts every block into `splits` chunks
along its own split axis (`store.split_axis`). A chunk is written by one of
the processes that hold all of it (its *holders*); which one follows the
block's shard file (`block // blocks_per_shard`), so no two processes ever
write the same file. A mesh whose process ranges cut across chunks would
leave a chunk without a holder: that is refused at start-up with the fix.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from hmem_jax.bank.exchange import BlockExchange
from hmem_jax.bank.layout import LevelLayout
from hmem_jax.errors import BankMismatchError

Box = tuple[tuple[int, int], ...]  # (start, stop) per block axis


def whole(shape: Sequence[int]) -> Box:
    return tuple((0, int(n)) for n in shape)


def box_index(box: Box, origin: Box | None = None) -> tuple[slice, ...]:
    """numpy/tensorstore index of `box` (relative to the corner of `origin`, if given)."""
    base = [0] * len(box) if origin is None else [lo for lo, _ in origin]
    return tuple(slice(lo - b, hi - b) for (lo, hi), b in zip(box, base))


def box_shape(box: Box) -> tuple[int, ...]:
    return tuple(hi - lo for lo, hi in box)


def store_chunks(shape: Sequence[int], axis: int | None, splits: int) -> list[Box]:
    """The store's chunks of one block field: `splits` equal pieces along `axis`."""
    if axis is None or splits == 1:
        return [whole(shape)]
    step = shape[axis] // splits
    return [
        tuple((i * step, (i + 1) * step) if a == axis else (0, int(n)) for a, n in enumerate(shape))
        for i in range(splits)
    ]


@dataclasses.dataclass(frozen=True)
class FieldPart:
    """One field of one level, seen from one process."""

    held: Box  # what the process caches and reads (covers all its devices' slices)
    writes: tuple[tuple[Box, tuple[int, ...]], ...]  # (store chunk, its holders) it may write

    def writer(self, holders: tuple[int, ...], block: int, blocks_per_shard: int) -> int:
        """The holder that writes `block`'s copy of a chunk (one per shard file)."""
        return holders[(block // blocks_per_shard) % len(holders)]


def _device_boxes(exchange: BlockExchange, shape: tuple[int, ...]) -> dict[int, list[Box]]:
    """process -> the boxes of one block field its devices hold in a step's view."""
    view = (1,) + shape
    sharding = NamedSharding(exchange.mesh, exchange.spec(view))
    out: dict[int, list[Box]] = {}
    for device, index in sharding.devices_indices_map(view).items():
        box = tuple(_bounds(s, n) for s, n in zip(index[1:], shape))
        out.setdefault(device.process_index, []).append(box)  # type: ignore[attr-defined]
    return out


def _covers(boxes: list[Box], chunk: Box, axis: int | None) -> bool:
    """Whether boxes that are whole but along `axis` (None: whole) together contain `chunk`."""
    if axis is None:
        return True
    reach, stop = chunk[axis]
    for lo, hi in sorted(b[axis] for b in boxes):
        if lo <= reach:
            reach = max(reach, hi)
    return reach >= stop


def _bounding(boxes: list[Box]) -> Box:
    return tuple(
        (min(b[a][0] for b in boxes), max(b[a][1] for b in boxes)) for a in range(len(boxes[0]))
    )


def process_parts(
    exchange: BlockExchange,
    layouts: Mapping[str, LevelLayout],
    split_axes: Mapping[str, Mapping[str, int | None]],
    splits: int,
    process_index: int,
    where: str = "the bank",
) -> dict[str, dict[str, FieldPart]]:
    """level key -> field -> this process's part (see module doc).

    `split_axes[key][field]` is the store's split axis of the field (block coordinates).
    Raises BankMismatchError if some chunk has no holder (the mesh cuts across chunks).
    """
    parts: dict[str, dict[str, FieldPart]] = {}
    for key, layout in layouts.items():
        parts[key] = {}
        for field, (shape, _) in layout.fields.items():
            boxes = _device_boxes(exchange, tuple(shape))
            view_axis = exchange.axis((1,) + tuple(shape))
            mesh_axis = None if view_axis is None else view_axis - 1
            writes = []
            for chunk in store_chunks(shape, split_axes[key][field], splits):
                holders = tuple(
                    sorted(p for p, held in boxes.items() if _covers(held, chunk, mesh_axis))
                )
                if not holders:
                    raise BankMismatchError(
                        f"{where} stores each block of {key} ({field}) in {splits} piece(s), "
                        f"but on this mesh no process holds all of piece {chunk} (the "
                        f"{len(boxes)} processes each hold a range of every block). Copy the "
                        "bank into a store cut in one piece per process (python -m "
                        "hmem_jax.main.bank copy --store=... --copy_to=NEW --gin_param="
                        f"MemoryConfig.store_splits={len(boxes)}) and point "
                        "MemoryConfig.bank_store at it."
                    )
                if process_index in holders:
                    writes.append((chunk, holders))
            parts[key][field] = FieldPart(_bounding(boxes[process_index]), tuple(writes))
    return parts


def single_process_parts(store: Any) -> dict[str, dict[str, FieldPart]]:
    """Whole blocks, every chunk written by process 0 (a one-process run, or a reader)."""
    return {
        key: {
            field: FieldPart(
                whole(shape),
                tuple(
                    (chunk, (0,))
                    for chunk in store_chunks(shape, store.split_axes[key][field], store.splits)
                ),
            )
            for field, (shape, _) in layout.fields.items()
        }
        for key, layout in store.layouts.items()
    }


def _bounds(index: slice, size: int) -> tuple[int, int]:
    """(start, stop) of a device's index slice along an axis of `size`."""
    return (index.start or 0, size if index.stop is None else index.stop)


def _within(index: tuple[slice, ...], held: Box, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """A device's index into a view leaf [U, *block], as slices of the part `held` (the block
    axes only, relative to the part's corner)."""
    inner = (_bounds(s, n) for s, n in zip(index[1:], shape[1:]))
    return tuple(slice(start - lo, stop - lo) for (start, stop), (lo, _) in zip(inner, held))


def to_global(
    part: np.ndarray, held: Box, shape: tuple[int, ...], sharding: NamedSharding
) -> jax.Array:
    """A step's view leaf [U, *block] on the mesh from this process's part [U, *held]."""
    part = np.asarray(part)

    def local(index: tuple[slice, ...] | None) -> np.ndarray:
        assert index is not None
        return part[(index[0],) + _within(index, held, shape)]

    return jax.make_array_from_callback(shape, sharding, local)


def from_global(array: jax.Array, held: Box) -> np.ndarray:
    """This process's part [U, *held] of a step's view leaf (its devices' slices)."""
    out_shape = (array.shape[0],) + box_shape(held)
    shards = array.addressable_shards
    if len(shards) == 1 and shards[0].data.shape == out_shape:
        return np.asarray(shards[0].data)  # a view on a CPU device: no copy
    out = np.empty(out_shape, array.dtype)
    for shard in shards:
        out[(shard.index[0],) + _within(shard.index, held, array.shape)] = np.asarray(shard.data)
    return out
