"""The real command line, end to end: prepare on first run, train, resume, clear errors."""

import json
import os
import subprocess
import sys

import pytest


def _train(workdir, params, probe_limit=0):
    from helpers.small import run_entry_point

    return run_entry_point(
        "hmem_jax.main.train", workdir, params, 2, f"--probe_limit={probe_limit}"
    )


@pytest.mark.slow
@pytest.mark.ci
def test_train_command_clusters_prepares_trains_with_memory_and_resumes(tmp_path):
    from helpers.small import SMALL_TREE_PARAMS

    workdir = tmp_path / "run"
    params = list(SMALL_TREE_PARAMS) + [
        "TrainConfig.batch_size = 16",
        "TrainConfig.log_every = 10",
        "TrainConfig.checkpoint_every = 40",
        "OptimConfig.warmup_steps = 10",
        "OptimConfig.peak_lr = 1e-2",
        "MemoryConfig.kind = 'ffn'",
        "MemoryConfig.level_sizes = (16, 8)",
        "MemoryConfig.lr = 1e-2",
        "MemoryConfig.warmup_steps = 10",
        # A 2-device training mesh: the probe afterwards must still load the run on one device.
        "MeshConfig.data = 2",
        "MeshConfig.fsdp = 1",
    ]
    first = _train(workdir, params + ["TrainConfig.steps = 80"], probe_limit=20)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "long-tail probe" in first.stdout and "fetched" in first.stdout
    assert "starting fresh" in first.stdout and "step 80/80" in first.stdout
    assert os.path.isfile(workdir / "tree" / "tree.json")  # clustered on first run
    assert os.path.isfile(workdir / "data" / "manifest.json")  # prepared on first run
    assert "TrainConfig.steps = 80" in (workdir / "config.gin").read_text()
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    losses = [r["train/loss"] for r in rows]
    assert all(r["mem/unique_blocks_l2"] >= 1 for r in rows)
    # A uniform guess over the 512-token vocabulary costs ln(512) = 6.24 nats.
    assert losses[-1] < losses[0] - 0.8 and losses[-1] < 6.24 - 2.0, losses

    again = _train(workdir, params + ["TrainConfig.steps = 80"])
    assert again.returncode == 0 and "resuming from step 80" in again.stdout


def test_train_command_reports_a_bad_binding_without_a_traceback(tmp_path):
    result = _train(tmp_path / "bad", ["ModelConfig.d_modle = 64"])
    assert result.returncode == 2
    assert "d_modle" in result.stderr and "Traceback" not in result.stderr


def test_hmem_console_script_dispatches_to_the_entry_points():
    out = subprocess.run(
        [sys.executable, "-m", "hmem_jax.main.cli", "info", "--gin_file=experiments/default.gin"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["fetched_params"] == 129_024
    bad = subprocess.run(
        [sys.executable, "-m", "hmem_jax.main.cli", "trian"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "train" in bad.stderr
