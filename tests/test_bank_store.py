"""The streamed bank's store: lazy init, versions, garbage collection, clear errors."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from helpers.bank import GEOMETRY, bumped, chunk_files, open_store

from hmem_jax.bank import device as bank_lib
from hmem_jax.bank.store import BankCorruptionError, BankMismatchError


@pytest.mark.parametrize("blocks_per_shard", [1, 4])
def test_a_never_written_block_reads_as_its_init_and_occupies_no_disk(tmp_path, blocks_per_shard):
    store = open_store(tmp_path / "bank", blocks_per_shard=blocks_per_shard)
    for key, level in (("l1", 1), ("l2", 2), ("generic", "generic")):
        eager = bank_lib.init_level(GEOMETRY, level, 0, jnp.float32, jnp.float32)
        ids = np.arange(store.layouts[key].clusters)[::-1]
        rows = store.read(key, ids)
        for name, value in eager.params.items():
            np.testing.assert_array_equal(rows[f"params/{name}"], np.asarray(value)[ids])
            assert not rows[f"mu/{name}"].any() and not rows[f"nu/{name}"].any()
        assert not rows["count"].any()
    assert chunk_files(tmp_path / "bank") == []
    store.write("l2", np.array([3]), bumped(store.read("l2", np.array([3]))))
    stored = {f.split("/c/")[1].split("/")[0] for f in chunk_files(tmp_path / "bank")}
    assert stored == {"3" if blocks_per_shard == 1 else "0"}  # block 3, or its shard of 4


def test_a_sealed_version_restores_exactly_after_later_writes(tmp_path):
    store = open_store(tmp_path / "bank")
    ids = np.array([1, 5])
    first = bumped(store.read("l2", ids))
    store.write("l2", ids, first)
    store.seal(3)
    store.write("l2", ids[:1], {f: v[:1] for f, v in bumped(first, 2.0).items()})
    store.write("l1", np.array([0]), bumped(store.read("l1", np.array([0]))))
    reopened = open_store(tmp_path / "bank")
    reopened.restore(3)
    for field, value in reopened.read("l2", ids).items():
        np.testing.assert_array_equal(value, first[field])
    assert not reopened.touched("l1").any()
    assert reopened.current_gen > store.current_gen  # never writes into a torn generation


def test_garbage_collection_keeps_exactly_what_kept_versions_use(tmp_path):
    store = open_store(tmp_path / "bank")
    ids = np.array([1, 5])
    store.write("l2", ids, bumped(store.read("l2", ids)))
    store.seal(3)
    newer = bumped(store.read("l2", ids[:1]))
    store.write("l2", ids[:1], newer)
    store.seal(6)
    before = len(chunk_files(tmp_path / "bank"))
    stats = store.collect_garbage(keep=[6])
    assert stats["versions_dropped"] == 1 and stats["blocks_freed"] == 1
    assert len(chunk_files(tmp_path / "bank")) < before
    assert store.versions() == [6]
    reopened = open_store(tmp_path / "bank")
    reopened.restore(6)
    np.testing.assert_array_equal(reopened.read("l2", ids[:1])["params/up"], newer["params/up"])


def test_a_memory_kvstore_holds_a_bank():
    store = open_store({"driver": "memory", "path": "bank/"})
    rows = bumped(store.read("l1", np.array([2])))
    store.write("l1", np.array([2]), rows)
    np.testing.assert_array_equal(
        store.read("l1", np.array([2]))["params/gate"], rows["params/gate"]
    )


def test_a_manifest_that_does_not_match_the_config_is_a_clear_error(tmp_path):
    open_store(tmp_path / "bank", seed=0)
    with pytest.raises(BankMismatchError, match=r"init_seed: store has 0, this run has 1"):
        open_store(tmp_path / "bank", seed=1)


@pytest.mark.parametrize("damage", ["corrupt", "delete"])
def test_a_corrupted_or_missing_chunk_is_a_clear_error(tmp_path, damage):
    store = open_store(tmp_path / "bank")
    store.write("l2", np.array([7]), bumped(store.read("l2", np.array([7]))))
    store.seal(1)
    path = next(f for f in chunk_files(tmp_path / "bank") if "params/up" in f)
    if damage == "corrupt":
        data = bytearray(open(path, "rb").read())
        data[10] ^= 0xFF
        open(path, "wb").write(bytes(data))
    else:
        os.remove(path)
    reopened = open_store(tmp_path / "bank")
    reopened.restore(1)
    expected = "Digest mismatch" if damage == "corrupt" else "missing"
    with pytest.raises(
        BankCorruptionError,
        match=rf"Blocks \[7\] of level l2 \(params/up.*"
        rf"{expected}.*store is damaged",
    ):
        reopened.read("l2", np.array([7]))


def test_a_missing_version_is_a_clear_error(tmp_path):
    store = open_store(tmp_path / "bank")
    with pytest.raises(BankCorruptionError, match="Bank version 9 is missing"):
        store.restore(9)
