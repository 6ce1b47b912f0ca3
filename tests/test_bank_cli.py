"""python -m hmem_jax.main.bank: inspect, copy between stores, export."""

import json
import os
import subprocess
import sys

import numpy as np
from helpers.bank import GEOMETRY, bumped, open_store

from hmem_jax.main import bank as bank_cli


def trained_store(path):
    store = open_store(path)
    rows = bumped(store.read("l2", np.array([2, 9])))
    store.write("l2", np.array([2, 9]), rows)
    store.seal(5)
    return store, rows


def test_inspect_reports_the_touched_fraction_and_norms(tmp_path):
    store, _ = trained_store(tmp_path / "bank")
    report = bank_cli.inspect(store, 5, norm_blocks=8)
    assert report["levels"]["l2"]["touched_blocks"] == 2
    assert report["levels"]["l2"]["touched_fraction"] == 2 / 16
    assert report["levels"]["l1"]["touched_blocks"] == 0
    assert report["levels"]["l2"]["mean_updates"] == 1.0
    assert report["levels"]["l2"]["mean_norms"]["params/down"] > 0


def test_copy_to_another_kvstore_keeps_the_version_and_export_materialises_it(tmp_path):
    store, rows = trained_store(tmp_path / "bank")
    target = open_store({"driver": "memory", "path": "copy/"})
    assert bank_cli.copy(store, target, 5) == 2
    target.restore(5)
    np.testing.assert_array_equal(
        target.read("l2", np.array([9]))["params/up"], rows["params/up"][1:]
    )
    files = bank_cli.export(target, str(tmp_path / "export"))
    assert len(files) == 3 * len(target.layouts)
    up = np.load(tmp_path / "export" / "l2" / "up.npy")
    assert up.shape == (16,) + GEOMETRY.block_shape("up", 2)
    np.testing.assert_array_equal(up[[2, 9]], rows["params/up"])
    np.testing.assert_array_equal(up[3], store.read("l2", np.array([3]))["params/up"][0])


def test_the_command_line_creates_and_inspects_a_bank(tmp_path):
    gin = [
        "--gin_param=MemoryConfig.kind = 'ffn'",
        "--gin_param=MemoryConfig.level_sizes = (4, 2)",
        "--gin_param=HierarchyConfig.branching = 4",
        "--gin_param=HierarchyConfig.depth = 2",
        f"--store={tmp_path / 'bank'}",
    ]
    run = lambda *args: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "hmem_jax.main.bank", *args, *gin],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
        timeout=120,
    )
    created = run("create")
    assert created.returncode == 0, created.stderr
    inspected = run("inspect", "--norm_blocks=0")
    assert inspected.returncode == 0, inspected.stderr
    report = json.loads(inspected.stdout)
    assert report["version"] is None and report["levels"]["l1"]["touched_fraction"] == 0


def test_a_lost_manifest_is_never_replaced_by_a_new_bank_and_can_be_recovered(tmp_path):
    import pytest

    from hmem_jax.bank.geometry import BankGeometry
    from hmem_jax.bank.store import BankMismatchError, BankStore, BankStoreError
    from hmem_jax.config import HierarchyConfig, MemoryConfig, ModelConfig

    store, rows = trained_store(tmp_path / "bank")
    uid = store.uid
    os.remove(tmp_path / "bank" / "manifest.json")
    for create in (True, False):
        with pytest.raises(BankStoreError, match="holds bank data but no manifest.json"):
            open_store(tmp_path / "bank", create=create)
    assert not (tmp_path / "bank" / "manifest.json").exists()

    other = BankGeometry.from_configs(
        ModelConfig(num_layers=2, d_model=32, d_ff=64, num_heads=2, head_dim=16),
        MemoryConfig(kind="ffn", level_sizes=(4, 3)),
        HierarchyConfig(branching=4, depth=2),
    )
    spec = {"driver": "file", "path": str(tmp_path / "bank") + "/"}
    with pytest.raises(BankMismatchError, match="Nothing was written"):
        BankStore(spec, other, True, "float32", "float32", 0, recover_uid=uid)
    assert not (tmp_path / "bank" / "manifest.json").exists()

    recovered = open_store(tmp_path / "bank", recover_uid=uid)
    assert recovered.uid == uid
    recovered.restore(5)
    np.testing.assert_array_equal(
        recovered.read("l2", np.array([2, 9]))["params/up"], rows["params/up"]
    )
