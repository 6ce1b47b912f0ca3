"""launch/: each script's --dry_run prints exactly the command it runs; local.sh starts N processes,
forwards signals and fails fast; slurm.sbatch relays SLURM's SIGTERM and requeues; the XPK pod
command asks XPK for a restart after a preemption; and 2 processes launched by local.sh train
like one."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers.launch import (
    LAUNCH,
    fake_python,
    fake_starts,
    process_lines,
    run_local,
    train_flags,
)

# Gin params the shell must not touch: spaces, both quotes, $, backquotes, a backslash.
AWKWARD = (
    "TrainConfig.init_from = 'runs/anchor one'",
    'DataConfig.source = "it\'s $HOME `date`"',
    "TrainConfig.note = 'a\\b'",
)
AWKWARD_FLAGS = [f"--gin_param={p}" for p in AWKWARD]
TRAIN = "hmem_jax.main.train"


def _script(name, *args, env=None, timeout=30):
    return subprocess.run(
        ["bash", os.path.join(LAUNCH, name), *args],
        env=dict(os.environ, **(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _wait_for_starts(log, count, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(log) as lines:
            if sum(1 for _ in lines) >= count:
                return
        time.sleep(0.05)
    raise AssertionError(f"{count} start(s) not recorded in {timeout} s")


# --- local.sh --------------------------------------------------------------------------------


def test_local_dry_run_prints_each_process_command_exactly():
    done = _script(
        "local.sh",
        "3",
        "--devices_per_process=4",
        "--port=29500",
        "--dry_run",
        "--workdir=/runs/x",
        *AWKWARD_FLAGS,
        env={
            "HMEM_PYTHON": "python",
            "XLA_FLAGS": "--xla_dump_to=/d --xla_force_host_platform_device_count=8",
        },
    )
    assert done.returncode == 0, done.stderr
    xla = shlex.quote("--xla_dump_to=/d --xla_force_host_platform_device_count=4")
    want = [
        f"PYTHONUNBUFFERED=1 XLA_FLAGS={xla} JAX_PLATFORMS=cpu "
        + shlex.join(
            ["python", "-m", TRAIN, "--coordinator_address=127.0.0.1:29500", "--num_processes=3"]
            + [f"--process_id={i}", "--workdir=/runs/x", *AWKWARD_FLAGS]
        )
        for i in range(3)
    ]
    assert done.stdout.splitlines() == want


def test_local_dry_run_commands_run_as_printed(tmp_path):
    """Run through a shell, each printed line starts its process with the exact argv and
    environment: ids 0..N-1, one coordinator address (a free port) for all."""
    python, log = fake_python(tmp_path)
    env = {"HMEM_PYTHON": python, "FAKE_LOG": log}
    done = _script("local.sh", "3", "--dry_run", "--", "--dry_run", *AWKWARD_FLAGS, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3
    for line in lines:
        subprocess.run(["bash", "-c", line], env=dict(os.environ, **env), check=True, timeout=30)
    starts = fake_starts(log)
    coordinator = starts[0]["argv"][2]
    assert coordinator.startswith("--coordinator_address=127.0.0.1:")
    for i, start in enumerate(starts):
        assert start["argv"] == ["-m", TRAIN, coordinator, "--num_processes=3"] + [
            f"--process_id={i}",
            "--dry_run",  # after `--`: the trainer's, not the launcher's
            *AWKWARD_FLAGS,
        ]
        # No device count asked for: XLA_FLAGS as inherited, JAX_PLATFORMS not set.
        assert start["env"].get("XLA_FLAGS") == os.environ.get("XLA_FLAGS")
        assert "JAX_PLATFORMS" not in start["env"] and start["env"]["PYTHONUNBUFFERED"] == "1"


def test_local_starts_every_process_prefixes_its_lines_and_logs_them(tmp_path):
    python, log = fake_python(tmp_path)
    done = run_local(
        3,
        "--devices_per_process=2",
        f"--log_dir={tmp_path / 'logs'}",
        *AWKWARD_FLAGS,
        env=dict(os.environ, HMEM_PYTHON=python, FAKE_LOG=log, FAKE_SLEEP="0.5"),
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    starts = fake_starts(log)
    assert [s["argv"][4] for s in starts] == ["--process_id=0", "--process_id=1", "--process_id=2"]
    assert len({s["argv"][2] for s in starts}) == 1  # one coordinator
    for i, start in enumerate(starts):
        assert start["argv"][5:] == AWKWARD_FLAGS
        assert start["env"]["XLA_FLAGS"].endswith("--xla_force_host_platform_device_count=2")
        assert start["env"]["JAX_PLATFORMS"] == "cpu"
        assert process_lines(done.stdout, i) == [f"fake trainer {i} started", "finished"]
        with open(tmp_path / "logs" / f"process_{i}.log") as raw:
            assert raw.read() == f"fake trainer {i} started\nfinished\n"


def test_local_failing_process_stops_the_others_and_exits_with_its_status(tmp_path):
    """Process 1 fails; process 0 would run for a minute and ignores SIGTERM (as a trainer
    stuck in a collective with a dead peer might): SIGKILL follows after the grace period."""
    python, log = fake_python(tmp_path)
    env = dict(os.environ, HMEM_PYTHON=python, FAKE_LOG=log, FAKE_EXIT="1:3", FAKE_SLEEP="60")
    start = time.time()
    done = run_local(2, env=dict(env, FAKE_ON_TERM="ignore", HMEM_KILL_GRACE_S="1"), timeout=60)
    assert done.returncode == 3, done.stdout + done.stderr
    assert time.time() - start < 20
    assert "process 1 exited with status 3; stopping the other processes" in done.stderr
    assert "killing them" in done.stderr
    assert process_lines(done.stdout, 1) == ["fake trainer 1 started", "failing with 3"]
    # The others are asked to stop with SIGTERM first.
    done = run_local(2, env=env, timeout=60)
    assert done.returncode == 3
    assert process_lines(done.stdout, 0)[-1] == "stopping on SIGTERM"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_local_forwards_signals_and_exits_0_when_every_process_stops_cleanly(tmp_path, sig):
    python, log = fake_python(tmp_path)
    proc = subprocess.Popen(
        [os.path.join(LAUNCH, "local.sh"), "2"],
        env=dict(os.environ, HMEM_PYTHON=python, FAKE_LOG=log, FAKE_SLEEP="60"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_starts(log, 2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, out + err
    for i in range(2):
        assert process_lines(out, i)[-1] == f"stopping on {sig.name}"


@pytest.mark.parametrize(
    "args", [("0",), ("two",), ("2", "--process_id=1"), ("2", "--devices_per_process=x")]
)
def test_local_refuses_a_bad_count_and_the_flags_it_sets(args):
    done = _script("local.sh", *args, "--dry_run")
    assert done.returncode == 2
    assert done.stderr.startswith("local.sh: ") and done.stdout == ""


@pytest.mark.multiprocess
def test_local_trainer_with_a_bad_gin_param_fails_fast(tmp_path):
    start = time.time()
    done = run_local(
        2,
        "--devices_per_process=2",
        f"--workdir={tmp_path / 'run'}",
        "--gin_param=TrainConfig.no_such_field = 1",
        timeout=120,
    )
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr
    assert time.time() - start < 60
    assert any("no_such_field" in line for line in process_lines(done.stdout, 0))


def test_distributed_auto_outside_a_cluster_is_one_line(tmp_path):
    clusters = ("SLURM_", "OMPI_", "PMI_", "TPU_", "MEGASCALE_", "KUBERNETES_", "JAX_COORDINATOR")
    env = {k: v for k, v in os.environ.items() if not k.startswith(clusters)}
    done = subprocess.run(
        [sys.executable, "-m", TRAIN, "--distributed=auto", f"--workdir={tmp_path}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith("error: --distributed=auto: JAX found no cluster environment")
    assert len(done.stderr.splitlines()) == 1 and "launch/README.md" in done.stderr


@pytest.mark.slow  # CI runs test_multihost's streamed-bank run, which starts local.sh the same way
@pytest.mark.multiprocess
def test_local_two_processes_train_like_one_process(tmp_path, small_prepared_data):
    """2 processes x 4 devices and 1 process x 8 devices, same global batch: same losses and
    checkpoints."""
    _, params = small_prepared_data
    params = params + (
        "TrainConfig.steps = 6",
        "TrainConfig.batch_size = 8",
        "TrainConfig.log_every = 1",
        "TrainConfig.checkpoint_every = 3",
        "MeshConfig.data = 2",
        "MeshConfig.fsdp = -1",
    )
    single, multi = tmp_path / "single", tmp_path / "multi"
    done = run_local(1, "--devices_per_process=8", *train_flags(single, params))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    # With the probe that follows training: process 0 reads the run alone, the other waits.
    done = run_local(2, "--devices_per_process=4", *train_flags(multi, params, "--probe_limit=3"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    lines = process_lines(done.stdout, 0)
    assert any("2 process(es)" in line for line in lines)
    assert any("long-tail probe" in line for line in lines), done.stdout[-3000:]

    def losses(workdir):
        rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
        return np.array([r["train/loss"] for r in rows]), [r["step"] for r in rows]

    (want, steps), (got, multi_steps) = losses(single), losses(multi)
    assert steps == multi_steps == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert sorted(os.listdir(multi / "checkpoints")) == sorted(os.listdir(single / "checkpoints"))


# --- slurm.sbatch ----------------------------------------------------------------------------

SLURM_ENV = {
    "SLURM_JOB_ID": "4242",
    "SLURM_NNODES": "2",
    "SLURM_NTASKS": "16",
    "SLURM_NTASKS_PER_NODE": "8",
    "SLURM_GPUS_ON_NODE": "8",
    "SLURM_STEP_NODELIST": "gpu[001-002]",
    "HMEM_PYTHON": "python",
}


@pytest.mark.parametrize("per", ["gpu", "node"])
def test_slurm_dry_run_prints_the_srun_command_exactly(per):
    env = dict(SLURM_ENV)
    if per == "node":
        env.update(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1", SLURM_GPUS_PER_NODE="h100:8")
    done = _script("slurm.sbatch", "--dry_run", "--workdir=/shared/runs/x", *AWKWARD_FLAGS, env=env)
    assert done.returncode == 0, done.stderr
    srun = ["srun", "--kill-on-bad-exit=1", "--label", "python", "-m", TRAIN, "--distributed=auto"]
    want = shlex.join(srun + ["--workdir=/shared/runs/x", *AWKWARD_FLAGS])
    if per == "node":  # one process drives all 8 GPUs of its node
        want = "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7 " + want
    assert done.stdout == want + "\n"
    # HMEM_DRY_RUN=1 is the same as --dry_run.
    again = _script(
        "slurm.sbatch", "--workdir=/shared/runs/x", *AWKWARD_FLAGS, env=dict(env, HMEM_DRY_RUN="1")
    )
    assert again.stdout == done.stdout


@pytest.mark.parametrize(
    "args, says",
    [
        (["--gin_param=TrainConfig.steps = 1"], "pass --workdir"),
        (["--workdir=/tmp/run"], "node-local"),
        (["--workdir=/shared/x", "--num_processes=2"], "leave these flags out"),
    ],
)
def test_slurm_refuses_a_missing_or_node_local_workdir_and_process_flags(args, says):
    done = _script("slurm.sbatch", "--dry_run", *args, env=SLURM_ENV)
    assert done.returncode == 2 and says in done.stderr and done.stdout == ""


def _fake_slurm(tmp_path):
    """srun (runs its command in place), scancel (SIGTERM to that command), scontrol (records)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    step = '"$FAKE_SLURM/step.pid"'
    scripts = {
        "srun": f'while [[ $1 == --* ]]; do shift; done\necho $$ > {step}\nexec "$@"',
        "scancel": f'echo "scancel $*" >> "$FAKE_SLURM/calls"\nkill -TERM "$(cat {step})"',
        "scontrol": 'echo "scontrol $*" >> "$FAKE_SLURM/calls"',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    python, log = fake_python(tmp_path)
    env = dict(os.environ, **SLURM_ENV, FAKE_SLURM=str(tmp_path), FAKE_LOG=log)
    env.update(HMEM_PYTHON=python, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return env, log, tmp_path / "calls"


def test_slurm_relays_sigterm_to_the_trainers_and_requeues_after_a_clean_stop(tmp_path):
    env, log, calls = _fake_slurm(tmp_path)
    proc = subprocess.Popen(
        ["bash", os.path.join(LAUNCH, "slurm.sbatch"), "--workdir=/shared/x", *AWKWARD_FLAGS],
        env=dict(env, FAKE_SLEEP="60"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_starts(log, 1)
    proc.send_signal(signal.SIGTERM)  # what --signal=B:TERM@120 sends the batch script
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, out + err
    assert out.splitlines()[-1] == "stopping on SIGTERM"
    assert calls.read_text().splitlines() == ["scancel --signal=TERM 4242", "scontrol requeue 4242"]
    [start] = fake_starts(log)
    assert start["argv"] == [
        "-m",
        TRAIN,
        "--distributed=auto",
        "--workdir=/shared/x",
        *AWKWARD_FLAGS,
    ]


def test_slurm_returns_the_trainers_status_and_requeues_only_after_sigterm(tmp_path):
    env, log, calls = _fake_slurm(tmp_path)
    for status in ("0", "3"):
        done = _script(
            "slurm.sbatch", "--workdir=/shared/x", env=dict(env, FAKE_EXIT=f"0:{status}")
        )
        assert done.returncode == int(status), done.stderr
    assert not calls.exists()


# --- xpk.sh ----------------------------------------------------------------------------------

XPK_FLAGS = ["--cluster=pod-1", "--workload=hmem-160m", "--tpu_type=v5p-128", "--num_slices=2"]


def _pod_command(stdout):
    """(the xpk argv without --command, the trainer's argv inside --command)."""
    argv = shlex.split(stdout)
    assert stdout == shlex.join(argv) + "\n"  # printed shell-quoted, one line
    assert argv[-1].startswith("--command=")
    pod = shlex.split(argv[-1][len("--command=") :])
    assert pod[:3] == ["exec", "bash", "-c"] and pod[4] == "hmem-train"
    return argv[:-1], pod[5:]


def test_xpk_dry_run_prints_the_xpk_command_exactly():
    done = _script(
        "xpk.sh",
        *XPK_FLAGS,
        "--docker_image=gcr.io/proj/hmem:1",
        "--project=proj",
        "--zone=us-east5-a",
        "--xpk_arg=--spot",
        "--dry_run",
        "--workdir=gs://bucket/runs/160m",
        *AWKWARD_FLAGS,
    )
    assert done.returncode == 0, done.stderr
    xpk, trainer = _pod_command(done.stdout)
    assert xpk == [
        "xpk",
        "workload",
        "create",
        "--cluster=pod-1",
        "--workload=hmem-160m",
        "--docker-image=gcr.io/proj/hmem:1",
        "--tpu-type=v5p-128",
        "--num-slices=2",
        "--max-restarts=20",
        "--termination-grace-period-seconds=120",
        "--project=proj",
        "--zone=us-east5-a",
        "--spot",
    ]
    assert (
        trainer
        == ["python3", "-m", TRAIN, "--distributed=auto", "--workdir=gs://bucket/runs/160m"]
        + AWKWARD_FLAGS
    )
    base = _script(
        "xpk.sh", *XPK_FLAGS, "--base_docker_image=python:3.11", "--dry_run", "--workdir=gs://b/r"
    )
    xpk, _ = _pod_command(base.stdout)
    assert xpk[5:7] == [
        "--base-docker-image=python:3.11",
        f"--script-dir={os.path.dirname(LAUNCH)}",
    ]


def test_xpk_pod_command_relays_sigterm_and_asks_xpk_to_restart_after_a_clean_stop(tmp_path):
    """The --command run the way XPK's container runs it (`(COMMAND) & PID=$!`, SIGTERM relayed
    to that PID): a finished or failing trainer keeps its status, one stopped by SIGTERM that
    exited 0 makes the pod exit 42 (XPK restarts the workload on 42)."""
    python, log = fake_python(tmp_path)
    done = _script(
        "xpk.sh",
        *XPK_FLAGS,
        "--docker_image=i",
        "--dry_run",
        "--workdir=gs://b/r",
        env={"HMEM_PYTHON": python},
    )
    command = shlex.split(done.stdout)[-1][len("--command=") :]
    container = (
        "trap 'kill -TERM $PID 2>/dev/null' TERM; (" + command + ") & PID=$!; "
        "while kill -0 $PID 2>/dev/null; do sleep 0.1; done; wait $PID"
    )

    def pod(sig=None, **env):
        proc = subprocess.Popen(
            ["bash", "-c", container],
            env=dict(os.environ, FAKE_LOG=log, **env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if sig:
            _wait_for_starts(log, len(fake_starts(log)) + 1)
            proc.send_signal(sig)
        out = proc.communicate(timeout=30)[0]
        return proc.returncode, out

    assert pod()[0] == 0
    assert pod(FAKE_EXIT="0:2")[0] == 2
    status, out = pod(signal.SIGTERM, FAKE_SLEEP="60")
    assert status == 42 and "stopping on SIGTERM" in out, out
    assert fake_starts(log)[-1]["argv"] == ["-m", TRAIN, "--distributed=auto", "--workdir=gs://b/r"]


@pytest.mark.parametrize(
    "args, says",
    [
        (["--workload=hmem", "--docker_image=i", "--workdir=/shared/x"], "--workdir=gs://"),
        (["--workload=Hmem_1", "--docker_image=i", "--workdir=gs://b/r"], "--workload='Hmem_1'"),
        (["--workload=hmem", "--workdir=gs://b/r"], "--docker_image"),
        (["--workload=hmem", "--docker_image=i", "--workdir=gs://b/r", "--process_id=0"], "leave"),
    ],
)
def test_xpk_refuses_a_local_workdir_a_bad_name_and_a_missing_image(args, says):
    done = _script("xpk.sh", "--cluster=c", "--tpu_type=v5p-8", "--dry_run", *args)
    assert done.returncode == 2 and says in done.stderr and done.stdout == "", done.stderr


def test_scripts_are_executable_and_bash():
    for name in ("local.sh", "slurm.sbatch", "xpk.sh"):
        path = os.path.join(LAUNCH, name)
        assert os.access(path, os.X_OK), name
        with open(path) as script:
            assert script.readline().rstrip() in ("#!/usr/bin/env bash", "#!/bin/bash"), name
        subprocess.run(["bash", "-n", path], check=True)
