"""Stopping a run cleanly on SIGTERM / SIGINT, at a step boundary every process agrees on.

A scheduler that preempts a job (SLURM's `--signal`, Kubernetes' termination
grace period, a TPU maintenance event) sends SIGTERM and kills the job some
time later. The loop asks `reached(step)` after each step; once it says yes,
the loop saves a checkpoint of that step, flushes its metrics and returns, so
the next start resumes exactly there.

One process: a Python handler records the signal; the next step boundary stops
(a second SIGINT interrupts at once, as Ctrl-C usually does).

Several processes (`jax.distributed`): the processes must stop after the same
step, or their collectives and the checkpoint would disagree. JAX's preemption
service does exactly this: it owns SIGTERM in every process, spreads a notice
received by any one to all, and `multihost_utils.reached_preemption_sync_point`
answers yes on every process at the same step. So SIGTERM is left to it, and
SIGINT (Ctrl-C on one process) is turned into a SIGTERM to the same process so
that it takes the same path.
"""

from __future__ import annotations

import os
import signal
import threading
import types
from typing import Any

import jax
from jax.experimental import multihost_utils

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """A context: while inside, SIGTERM / SIGINT ask the run to stop at a step boundary."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}
        self._distributed = jax.process_count() > 1

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        for signum in _SIGNALS:
            if self._distributed and signum == signal.SIGTERM:
                continue  # JAX's preemption service handles it in every process
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C does not wait for the step boundary
        self.received = signal.Signals(signum).name
        if self._distributed:
            os.kill(os.getpid(), signal.SIGTERM)  # a preemption notice for every process

    def reached(self, step: int) -> bool:
        """Whether the run stops after `step` (called once per step, on every process)."""
        if self._distributed:
            if multihost_utils.reached_preemption_sync_point(step):
                self.received = self.received or "SIGTERM"
                return True
            return False
        return self.received is not None
