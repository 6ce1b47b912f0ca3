"""The streamed bank tier trains exactly like the device-resident one (docs/bank.md)."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from helpers.bank import KILL_MID_WRITE_BACK, assert_banks_equal, streamed_bank
from helpers.training import MEMORY_BINDINGS, memory_config

from hmem_jax import sharding
from hmem_jax.config import MeshConfig
from hmem_jax.data.loader import Loader
from hmem_jax.train.loop import train
from hmem_jax.train.resume import fingerprint


def bank_config(params, **overrides):
    """The memory-training tests' config (batch 8, 6 steps, checkpoints every 3, ffn (8, 4))."""
    return memory_config(params, **overrides)


def run(cfg, prepared, workdir, **kwargs):
    loader = Loader(prepared, cfg.batch_size, cfg.seq_len, cfg.seed)
    result = train(
        cfg,
        str(workdir),
        loader,
        fingerprint(loader.fingerprint),
        devices=jax.devices()[:1],
        **kwargs,
    )
    return result, loader


@pytest.fixture(scope="module")
def device_run(tmp_path_factory, small_prepared_tree_data):
    """The device-resident tier's run: the reference trajectory and final bank."""
    prepared, _, params = small_prepared_tree_data
    result, _ = run(bank_config(params), prepared, tmp_path_factory.mktemp("device") / "run")
    return result


def test_streamed_and_device_tiers_give_the_same_losses_and_bank(
    tmp_path, device_run, small_prepared_tree_data
):
    prepared, _, params = small_prepared_tree_data
    device = device_run
    # Without prefetch here; the tiny-cache test below prefetches 2 steps ahead.
    cfg = bank_config(params, memory={"bank_tier": "streaming", "prefetch_steps": 0})
    streamed, _ = run(cfg, prepared, tmp_path / "streamed")
    assert streamed.state.bank is None
    assert streamed.losses == device.losses
    assert_banks_equal(device.state.bank, streamed_bank(cfg, streamed.bank_store))


@pytest.mark.parametrize(
    "mesh", [MeshConfig(data=2, fsdp=4), MeshConfig(data=8, fsdp=1)], ids=["d2-f4", "d8"]
)
def test_a_streamed_bank_on_8_devices_trains_like_the_device_bank_on_one(
    tmp_path, device_run, small_prepared_tree_data, mesh
):
    """Per-shard blocks from a host tier's rows: the same losses and final bank, to float
    tolerance (8 shards sum a shared block's gradient in another order)."""
    prepared, _, params = small_prepared_tree_data
    cfg = bank_config(params, mesh=mesh, memory={"bank_tier": "streaming", "prefetch_steps": 1})
    loader = Loader(
        prepared,
        cfg.batch_size,
        cfg.seq_len,
        cfg.seed,
        batch_shards=sharding.batch_shards_for(cfg.mesh, 8),
    )
    streamed = train(
        cfg,
        str(tmp_path / "streamed"),
        loader,
        fingerprint(loader.fingerprint),
        devices=jax.devices(),
    )
    steps = sorted(device_run.losses)
    np.testing.assert_allclose(
        [streamed.losses[k] for k in steps], [device_run.losses[k] for k in steps], rtol=2e-5
    )
    final = streamed_bank(cfg, streamed.bank_store)
    for key, level in device_run.state.bank.items():
        for kind in ("params", "mu", "nu"):
            for name, value in getattr(level, kind).items():
                np.testing.assert_allclose(
                    final[key][f"{kind}/{name}"],
                    np.asarray(value),
                    rtol=1e-3,
                    atol=1e-4,
                    err_msg=f"{key} {kind}/{name}",
                )
        np.testing.assert_array_equal(final[key]["count"], np.asarray(level.count))


def test_cache_eviction_under_a_tiny_byte_budget_stays_exact(
    tmp_path, device_run, small_prepared_tree_data
):
    prepared, _, params = small_prepared_tree_data
    cfg = bank_config(
        params, memory={"bank_tier": "streaming", "host_cache_bytes": 1, "prefetch_steps": 2}
    )
    streamed, _ = run(cfg, prepared, tmp_path / "tiny_cache")
    assert streamed.losses == device_run.losses
    assert_banks_equal(device_run.state.bank, streamed_bank(cfg, streamed.bank_store))


KILLED_RUN = (
    textwrap.dedent("""
    import json, os, signal, sys
    import jax, numpy as np
    from hmem_jax.data.loader import Loader
    from hmem_jax.main.common import load_train_config
    from hmem_jax.train.loop import train
    from hmem_jax.train.resume import fingerprint
    import dataclasses

    args = json.loads(sys.argv[1])
""")
    + KILL_MID_WRITE_BACK
    + textwrap.dedent("""
    cfg = load_train_config((), tuple(args["params"]))
    cfg = dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, **args["memory"]))
    loader = Loader(args["prepared"], cfg.batch_size, cfg.seq_len, cfg.seed)
    train(cfg, args["workdir"], loader, fingerprint(loader.fingerprint), devices=jax.devices()[:1])
    print("NOT KILLED")
""")
)


@pytest.mark.slow
@pytest.mark.ci
def test_kill_9_during_write_back_then_resume_follows_the_uninterrupted_run(
    tmp_path, device_run, small_prepared_tree_data
):
    prepared, _, params = small_prepared_tree_data
    memory = {"bank_tier": "streaming", "prefetch_steps": 1}
    cfg = bank_config(params, memory=memory)
    workdir = tmp_path / "killed"
    child_params = list(params + MEMORY_BINDINGS)
    args = {"params": child_params, "memory": memory, "prepared": prepared, "workdir": str(workdir)}
    env = dict(
        os.environ,
        JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    child = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    assert max(int(s) for s in os.listdir(workdir / "checkpoints")) == 3
    resumed, _ = run(cfg, prepared, workdir)
    assert resumed.losses == {k: v for k, v in device_run.losses.items() if k > 3}
    assert_banks_equal(device_run.state.bank, streamed_bank(cfg, resumed.bank_store))
