"""A process's part of every block: store chunks per part, partial reads and writes, holders."""

import jax
import numpy as np
import pytest
from helpers.bank import bumped, chunk_files, open_store

from hmem_jax import sharding
from hmem_jax.bank import parts as parts_lib
from hmem_jax.bank.exchange import BlockExchange
from hmem_jax.bank.store import BankMismatchError
from hmem_jax.config import MeshConfig


def _exchange(cfg=MeshConfig(data=2, fsdp=4)):
    mesh = sharding.build_mesh(cfg, jax.devices()[:8])
    return BlockExchange.for_mesh(mesh, sharding.rules_of(cfg))


@pytest.mark.parametrize("blocks_per_shard", [1, 2])
def test_a_split_store_reads_and_writes_each_piece_on_its_own(tmp_path, blocks_per_shard):
    """Two pieces per block: a piece written alone changes only its half, a piece read alone
    is that half, and each half lives in chunks of its own."""
    store = open_store(tmp_path / "bank", splits=2, blocks_per_shard=blocks_per_shard)
    ids = np.array([2, 3])
    before = store.read("l2", ids)
    new = bumped(before)
    field = "params/down"
    shape = store.layouts["l2"].fields[field][0]
    axis = store.split_axes["l2"][field]
    assert axis is not None and shape[axis] == 32  # d_model, the exchange's split axis too
    low, high = parts_lib.store_chunks(shape, axis, 2)
    store.write_pieces(
        "l2", [(field, ids, new[field][(slice(None),) + parts_lib.box_index(low)], low)]
    )
    store.mark_written("l2", ids)
    # The other field and half were never written: a missing chunk is an error, so write the
    # rest of the block too, unchanged, as a writer of the other half would.
    store.write_pieces(
        "l2",
        [(field, ids, before[field][(slice(None),) + parts_lib.box_index(high)], high)]
        + [
            (f, ids, before[f], parts_lib.whole(s))
            for f, (s, _) in store.layouts["l2"].fields.items()
            if f != field
        ],
    )
    got = store.read("l2", ids)
    want = before[field].copy()
    want[(slice(None),) + parts_lib.box_index(low)] = new[field][
        (slice(None),) + parts_lib.box_index(low)
    ]
    np.testing.assert_array_equal(got[field], want)
    half = store.read(
        "l2",
        ids,
        {
            f: parts_lib.whole(s) if f != field else high
            for f, (s, _) in store.layouts["l2"].fields.items()
        },
    )
    np.testing.assert_array_equal(
        half[field], before[field][(slice(None),) + parts_lib.box_index(high)]
    )
    files = [f for f in chunk_files(tmp_path / "bank") if "/params/down/" in f]
    assert len(files) == 2 * len(ids) // blocks_per_shard  # one object per (shard of) half


def test_one_process_holds_and_writes_every_piece(tmp_path):
    store = open_store(tmp_path / "bank", splits=2)
    parts = parts_lib.process_parts(_exchange(), store.layouts, store.split_axes, store.splits, 0)
    assert parts == parts_lib.single_process_parts(store)
    for key, fields in parts.items():
        for field, part in fields.items():
            shape = store.layouts[key].fields[field][0]
            assert part.held == parts_lib.whole(shape)
            assert [holders for _, holders in part.writes] == [(0,)] * (1 if not shape else 2)


def _two_processes(exchange):
    """_device_boxes as if devices 0-3 belonged to process 0 and 4-7 to process 1."""
    real = parts_lib._device_boxes

    def boxes(exchange_, shape):
        from jax.sharding import NamedSharding

        view = (1,) + shape
        where = NamedSharding(exchange.mesh, exchange.spec(view))
        out = {}
        for device, index in where.devices_indices_map(view).items():
            box = tuple(
                (s.start or 0, shape[a] if s.stop is None else s.stop)
                for a, s in enumerate(index[1:])
            )
            out.setdefault(device.id // 4, []).append(box)
        assert set(real(exchange_, shape)) == {0}
        return out

    return boxes


@pytest.mark.parametrize("splits,ok", [(1, False), (2, True), (4, True), (3, False)])
def test_each_piece_needs_a_process_that_holds_all_of_it(tmp_path, monkeypatch, splits, ok):
    """Two processes holding half of every block each: a store cut in 2 or 4 gives each piece
    one holder; in 1 or 3 pieces some piece straddles both, which is refused with the fix."""
    exchange = _exchange()
    monkeypatch.setattr(parts_lib, "_device_boxes", _two_processes(exchange))
    store = open_store(tmp_path / "bank", splits=splits)
    if splits == 3:  # no axis of a level's blocks divides by 3: one piece per block
        assert all(a is None for k in ("l1", "l2") for a in store.split_axes[k].values())
    if not ok:
        with pytest.raises(BankMismatchError, match="store_splits=2"):
            parts_lib.process_parts(exchange, store.layouts, store.split_axes, store.splits, 0)
        return
    for pid in (0, 1):
        parts = parts_lib.process_parts(
            exchange, store.layouts, store.split_axes, store.splits, pid
        )
        part = parts["l2"]["params/down"]
        axis = store.split_axes["l2"]["params/down"]
        assert part.held[axis] == ((0, 16), (16, 32))[pid]
        assert len(part.writes) == splits // 2
        assert all(holders == (pid,) for _, holders in part.writes)
        count = parts["l2"]["count"]
        assert count.held == () and count.writes == (((), (0, 1)),)
        # The whole count is written once per block, alternating between the processes.
        assert {count.writer((0, 1), b, 1) for b in range(4)} == {0, 1}


def test_a_processs_part_goes_to_its_devices_and_back():
    exchange = _exchange()
    shape = (6, 2, 32, 4)
    rows = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    held = parts_lib.whole(shape[1:])
    where = jax.sharding.NamedSharding(exchange.mesh, exchange.spec(shape))
    placed = parts_lib.to_global(rows, held, shape, where)
    assert placed.sharding.spec == exchange.spec(shape)
    np.testing.assert_array_equal(np.asarray(placed), rows)
    np.testing.assert_array_equal(parts_lib.from_global(placed, held), rows)
