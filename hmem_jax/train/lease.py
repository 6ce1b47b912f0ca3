"""One trainer per workdir: a lease file that a live job renews and a dead job lets expire.

Two jobs training into one workdir would interleave checkpoints, overwrite each
other's config and bank versions, and corrupt the run. So process 0 of a
training job holds `WORKDIR/trainer.lock` while it trains: a small JSON record
(job id, host, pid, when it was last renewed, how long the lease lasts) that a
background thread rewrites every `lease_s / 4` seconds. The other processes of
the job follow process 0's decision (a broadcast), so they share the lease.

A second job finds the record and stops at once with one line naming the
holder, unless the lease is stale:
- it was not renewed for `lease_s` seconds (default 120: the holder was killed
  without a chance to release it, e.g. SIGKILL or a lost node), or
- it names a process on this very host that no longer runs (a local kill -9 is
  recovered at once, without waiting for the lease to run out).
A job that ends, fails or is stopped by a signal removes its record. The file
is plain (on an object store, one object replaced whole at each renewal), so
`rm WORKDIR/trainer.lock` is the manual override.

The record is written and then read back before the job goes on, so of two
jobs racing for a free workdir the later writer wins and the other stops; this
guards against the common mistake (a second job on a live run), not against a
deliberate race on a filesystem without atomic create.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from hmem_jax import paths
from hmem_jax.errors import WorkdirBusyError

LOCK_FILE = "trainer.lock"
LEASE_S = 120.0


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


class WorkdirLease:
    """`with WorkdirLease(workdir):` trains with the workdir held (see the module docstring)."""

    def __init__(self, workdir: str, lease_s: float = LEASE_S) -> None:
        self.workdir = workdir
        self.path = paths.join(workdir, LOCK_FILE)
        self.lease_s = lease_s
        self.record = {
            "job": uuid.uuid4().hex,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "lease_s": lease_s,
        }
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _read(self) -> dict[str, Any] | None:
        try:
            if paths.is_remote(self.path) and not paths.isfile(self.path):
                return None
            return json.loads(paths.read_text(self.path))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable (a torn write): treat as stale

    def _write(self) -> None:
        text = json.dumps({**self.record, "renewed": time.time()})
        if paths.is_remote(self.path):
            paths.write_text(self.path, text)  # one PUT: an object is replaced whole
            return
        temporary = f"{self.path}.{self.record['job']}"
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temporary, self.path)

    def holder(self) -> str | None:
        """A description of the live job holding the workdir, or None if it is free."""
        found = self._read()
        if not found or found.get("job") == self.record["job"]:
            return None
        age = time.time() - float(found.get("renewed", 0))
        if age > float(found.get("lease_s", self.lease_s)):
            return None
        same_host = found.get("host") == self.record["host"]
        if same_host and not _process_alive(int(found.get("pid", -1))):
            return None
        return (
            f"job {found.get('job', '?')[:8]} (host {found.get('host')}, pid {found.get('pid')}, "
            f"renewed {age:.0f} s ago; its lease expires {found.get('lease_s')} s after the "
            "last renewal)"
        )

    def _acquire_here(self) -> str | None:
        """Process 0: take the lease, or the description of who holds it."""
        paths.makedirs(self.workdir)
        busy = self.holder()
        if busy is None:
            self._write()
            found = self._read() or {}
            if found.get("job") != self.record["job"]:
                busy = self.holder() or "another job that started at the same moment"
        return busy

    def __enter__(self) -> WorkdirLease:
        busy = self._acquire_here() if jax.process_index() == 0 else None
        if jax.process_count() > 1:
            taken = multihost_utils.broadcast_one_to_all(np.int32(busy is None))
            if not int(taken) and busy is None:
                busy = "another job (process 0 of this job says which)"
        if busy is not None:
            raise WorkdirBusyError(
                f"{self.workdir} is being trained by {busy}. Wait for it to end, "
                f"use another --workdir, or delete {self.path} if that job is surely gone."
            )
        if jax.process_index() == 0:
            self._renewer = threading.Thread(target=self._renew, daemon=True, name="hmem-lease")
            self._renewer.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                self._write()
            except OSError:
                pass  # a transient storage error: the next renewal tries again

    def __exit__(self, *exc: object) -> None:
        if self._renewer is None:
            return
        self._stop.set()
        self._renewer.join()
        self._renewer = None
        found = self._read()
        if found and found.get("job") == self.record["job"]:
            paths.remove(self.path)
