"""Two processes on loopback (jax.distributed) train together and agree with one process."""

import json
import os
import subprocess
import sys

import numpy as np
import portpicker
import pytest

pytestmark = pytest.mark.multiprocess


def _train_command(workdir, params, extra=()):
    args = [sys.executable, "-m", "hmem_jax.main.train", f"--workdir={workdir}",
            "--probe_limit=0"]
    args += [f"--gin_param={p}" for p in params] + list(extra)
    return args


def _env(devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _losses(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return np.array([r["train/loss"] for r in rows]), [r["step"] for r in rows]


def test_two_processes_train_together_and_match_one_process(tmp_path, small_prepared_data):
    prepared, params = small_prepared_data
    params = params + ("TrainConfig.steps = 6", "TrainConfig.batch_size = 8",
                       "TrainConfig.log_every = 1", "TrainConfig.checkpoint_every = 3",
                       "MeshConfig.data = 2", "MeshConfig.fsdp = -1")
    single = tmp_path / "single"
    subprocess.run(_train_command(single, params), env=_env(8), check=True, timeout=600,
                   capture_output=True)

    multi = tmp_path / "multi"
    port = portpicker.pick_unused_port()
    procs = [subprocess.Popen(
        _train_command(multi, params, [f"--coordinator_address=127.0.0.1:{port}",
                                       "--num_processes=2", f"--process_id={i}"]),
        env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
    assert "2 process(es)" in outputs[0]

    single_losses, steps = _losses(single)
    multi_losses, multi_steps = _losses(multi)
    assert steps == multi_steps == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(multi_losses, single_losses, rtol=1e-5)
    assert sorted(os.listdir(multi / "checkpoints")) == sorted(os.listdir(single / "checkpoints"))
