"""Preemption: SIGTERM stops a run after the current step with a checkpoint, exit status 0,
and the resumed run follows the uninterrupted one; time-based checkpoints; step profiles."""

import os
import signal
import subprocess
import time

import numpy as np
import portpicker
import pytest
from helpers.trainer import ENV, checkpoints, command, losses, params_for, wait_for_step

from hmem_jax.config import DataConfig, MeshConfig, ModelConfig, OptimConfig, TrainConfig
from hmem_jax.train.loop import train


def test_sigterm_checkpoints_the_current_step_exits_0_and_the_resume_matches(
    tmp_path, small_prepared_data
):
    steps = 400
    params = params_for(small_prepared_data, steps)
    whole = tmp_path / "whole"
    done = subprocess.run(
        command(whole, params), env=ENV, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]

    run = tmp_path / "run"
    proc = subprocess.Popen(
        command(run, params), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for_step(run, 3, [proc])
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    stopped = max(losses(run))
    assert stopped < steps, "the signal came too late to test anything"
    assert checkpoints(run) == [stopped]  # the step it stopped after, nothing else
    assert f"stopped by SIGTERM after step {stopped} of {steps}" in out
    assert "long-tail probe" not in out and "Traceback" not in err

    resumed = subprocess.run(
        command(run, params), env=ENV, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step {stopped}" in resumed.stdout
    assert losses(run) == losses(whole)  # bitwise: data and state are functions of the step


@pytest.mark.slow  # two trainers on loopback (~60 s on 2 cores)
def test_sigterm_to_one_of_two_processes_stops_both_after_the_same_step(
    tmp_path, small_prepared_data
):
    """JAX's preemption service spreads the notice: both processes stop after one step, save
    one checkpoint together and exit 0. (Started here, not by launch/local.sh, because only one
    of the two may get the signal; local.sh forwards it to all.)"""
    params = params_for(small_prepared_data, 2000) + ("MeshConfig.data = 2", "MeshConfig.fsdp = -1")
    run = tmp_path / "run"
    port = portpicker.pick_unused_port()
    procs = [
        subprocess.Popen(
            command(
                run,
                params,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        wait_for_step(run, 3, procs)
        procs[1].send_signal(signal.SIGTERM)
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs[1][1][-3000:]
    stopped = max(losses(run))
    assert checkpoints(run) == [stopped] and stopped < 2000
    assert f"stopped by SIGTERM after step {stopped}" in outputs[0][0]


class _SlowBatches:
    """Batches that take 50 ms each to read, so a run lasts a known minimum time."""

    def __init__(self, inner):
        self.inner, self.batch_shards = inner, inner.batch_shards

    def iterate(self, start_step):
        for step, batch in self.inner.iterate(start_step):
            time.sleep(0.05)
            yield step, batch


def _config(**overrides):
    base = dict(
        model=ModelConfig(
            vocab_size=512, num_layers=1, d_model=32, num_heads=2, head_dim=16, d_ff=64
        ),
        optim=OptimConfig(warmup_steps=1),
        mesh=MeshConfig(fsdp=1),
        data=DataConfig(vocab_size=512),
        steps=40,
        batch_size=4,
        seq_len=16,
        log_every=5,
        checkpoint_every=1000,
        keep_checkpoints=100,
        async_checkpointing=False,
    )
    return TrainConfig(**{**base, **overrides})


def test_checkpoint_every_s_saves_by_time_beside_the_step_interval(tmp_path, random_batches):
    """40 steps of at least 50 ms each (2 s or more): one save per second or so, not one per step,
    and the final step; with the time policy off only the final step is saved."""
    import jax

    def run(name, cfg):
        batches = _SlowBatches(random_batches(512, 4, 16))
        train(cfg, str(tmp_path / name), batches, "d", devices=jax.devices()[:1])
        return checkpoints(tmp_path / name)

    timed = run("timed", _config(checkpoint_every_s=1))
    assert 2 <= len(timed) <= 10 and timed[-1] == 40, timed
    gaps = np.diff(timed[:-1])  # the last is the run's end, saved whatever the time
    assert gaps.min() >= 10, timed  # >= 1 s apart at >= 50 ms a step (the first at once)
    assert run("steps", _config())[-1:] == [40]


def test_profile_steps_write_a_trace_of_those_steps(tmp_path, random_batches):
    import jax

    cfg = _config(steps=4, log_every=1)
    train(
        cfg,
        str(tmp_path / "run"),
        random_batches(512, 4, 16),
        "d",
        devices=jax.devices()[:1],
        profile_steps=(2, 3),
    )
    traces = [
        os.path.join(folder, f)
        for folder, _, files in os.walk(tmp_path / "run" / "profile")
        for f in files
        if f.endswith(".xplane.pb")
    ]
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 1000
