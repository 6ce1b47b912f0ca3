"""One trainer per workdir: a second job on a live workdir stops at once; stale leases expire."""

import json
import os
import signal
import socket
import subprocess
import time

import pytest
from helpers.trainer import ENV, command, params_for, wait_for_step

from hmem_jax.errors import WorkdirBusyError
from hmem_jax.train.lease import LOCK_FILE, WorkdirLease


def test_a_second_train_on_a_live_workdir_stops_in_one_line_and_changes_nothing(
    tmp_path, small_prepared_data
):
    params = params_for(small_prepared_data, 5000)
    run = tmp_path / "run"
    first = subprocess.Popen(
        command(run, params), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for_step(run, 2, [first])
        config = (run / "config.gin").read_bytes()
        second = subprocess.run(
            command(run, params + ("TrainConfig.seed = 7",)),
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 2, second.stderr[-3000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"{run} is being trained by job" in lines[0] and f"pid {first.pid}" in lines[0]
        assert (run / "config.gin").read_bytes() == config  # the second job wrote nothing
        assert first.poll() is None  # and the first goes on
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=300)
    assert first.returncode == 0
    assert not (run / LOCK_FILE).exists()  # released when the job ends


def _write_record(workdir, **fields):
    record = {"job": "f" * 32, "host": socket.gethostname(), "pid": os.getpid(), "lease_s": 120}
    record.update(fields)
    (workdir / LOCK_FILE).write_text(json.dumps(record))


@pytest.mark.parametrize(
    "fields, free",
    [
        ({}, False),  # a live process on this host, renewed just now
        ({"host": "node-17"}, False),  # another host, renewed just now
        ({"host": "node-17", "renewed_ago": 121}, True),  # not renewed within its lease
        ({"pid": 2**22 + 12345}, True),  # a process of this host that no longer runs
    ],
    ids=["live-here", "live-elsewhere", "expired", "dead-pid-here"],
)
def test_a_lease_is_free_only_when_expired_or_its_local_process_is_gone(tmp_path, fields, free):
    ago = fields.pop("renewed_ago", 0)
    _write_record(tmp_path, renewed=time.time() - ago, **fields)
    lease = WorkdirLease(str(tmp_path))
    if free:
        with lease:
            assert json.loads((tmp_path / LOCK_FILE).read_text())["job"] == lease.record["job"]
        assert not (tmp_path / LOCK_FILE).exists()
    else:
        with pytest.raises(WorkdirBusyError, match="is being trained by job ffffffff"):
            lease.__enter__()
        assert json.loads((tmp_path / LOCK_FILE).read_text())["job"] == "f" * 32  # untouched


def test_a_held_lease_is_renewed_and_released(tmp_path):
    with WorkdirLease(str(tmp_path), lease_s=0.4):
        first = json.loads((tmp_path / LOCK_FILE).read_text())["renewed"]
        time.sleep(0.5)
        assert json.loads((tmp_path / LOCK_FILE).read_text())["renewed"] > first
        with pytest.raises(WorkdirBusyError):
            WorkdirLease(str(tmp_path)).__enter__()  # still held: renewed within its lease
    assert not (tmp_path / LOCK_FILE).exists()


def test_an_unreadable_record_does_not_block_the_workdir(tmp_path):
    (tmp_path / LOCK_FILE).write_text("{torn")  # a write cut short: counts as stale
    with WorkdirLease(str(tmp_path)) as lease:
        assert json.loads((tmp_path / LOCK_FILE).read_text())["job"] == lease.record["job"]
