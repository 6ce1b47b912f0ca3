"""Bank-store helpers: a small test geometry, opening a store on it, listing its chunk files,
bumping rows, and reading or comparing a streamed bank's final blocks."""

import os

import numpy as np

from hmem_jax.bank.geometry import BankGeometry
from hmem_jax.bank.store import BankStore
from hmem_jax.config import HierarchyConfig, MemoryConfig, ModelConfig
from hmem_jax.train.memory import MemoryPlan

GEOMETRY = BankGeometry.from_configs(
    ModelConfig(num_layers=2, d_model=32, d_ff=64, num_heads=2, head_dim=16),
    MemoryConfig(kind="ffn", level_sizes=(4, 2)),
    HierarchyConfig(branching=4, depth=2),
)


def open_store(path, seed=0, **kwargs):
    spec = path if isinstance(path, dict) else {"driver": "file", "path": str(path) + "/"}
    return BankStore(spec, GEOMETRY, True, "float32", "float32", seed, **kwargs)


def chunk_files(path):
    return [
        os.path.join(d, f)
        for d, _, files in os.walk(path)
        for f in files
        if "/c/" in os.path.join(d, f) + "/" and f != "zarr.json"
    ]


def bumped(rows, by=1.0):
    return {f: (v + 1 if f == "count" else v + by).astype(v.dtype) for f, v in rows.items()}


def streamed_bank(cfg, spec, version=None):
    """level key -> {field: [clusters, ...]} of the store's latest (or given) version."""
    plan = MemoryPlan.from_config(cfg)
    store = BankStore(
        spec,
        plan.geometry,
        plan.with_generic,
        cfg.memory.bank_dtype,
        cfg.memory.moment_dtype,
        cfg.memory.init_seed,
        create=False,
        writer=False,
    )
    store.restore(store.versions()[-1] if version is None else version)
    return {
        key: store.read(key, np.arange(layout.clusters)) for key, layout in store.layouts.items()
    }


def assert_banks_equal(device_bank, streamed, exact=True):
    for key, level in device_bank.items():
        for kind in ("params", "mu", "nu"):
            for name, value in getattr(level, kind).items():
                got, want = streamed[key][f"{kind}/{name}"], np.asarray(value)
                if exact:
                    np.testing.assert_array_equal(got, want, err_msg=f"{key} {kind}/{name}")
                else:
                    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(streamed[key]["count"], np.asarray(level.count))


KILL_MID_WRITE_BACK = """
from hmem_jax.bank import store as _store_lib

_original_write = _store_lib.BankStore.write_pieces


def _write_then_die(self, key, pieces):
    # After the step-3 checkpoint: store one field of the blocks, then SIGKILL mid write-back.
    if self.version is not None and self.version >= 3:
        _original_write(self, key, list(pieces)[:1])
        os.kill(os.getpid(), signal.SIGKILL)
    return _original_write(self, key, pieces)


_store_lib.BankStore.write_pieces = _write_then_die
"""
"""Child-script source (it needs `os` and `signal` imported): every bank store write after the
step-3 checkpoint writes one field and then kills the process, as a crash mid write-back would."""
