"""A `jax.profiler` trace of chosen training steps, for TensorBoard's profile plugin or Perfetto.

`--profile_steps=START,END` traces steps START..END (1-based, as the logs count
them) into `WORKDIR/profile/`. The trace starts before step START is
dispatched and stops once step END has finished on the devices, so it holds
whole steps: their host work, the transfers and the device execution. Each
process writes its own trace (file names carry the host name); on an
object-store workdir it is written locally and uploaded when the trace stops
(the profiler writes local files).
"""

from __future__ import annotations

from typing import Any

import jax

from hmem_jax import paths
from hmem_jax.errors import ConfigError

PROFILE_DIR = "profile"


def parse_profile_steps(text: str) -> tuple[int, int] | None:
    """'START,END' -> (START, END); '' -> None. Steps are 1-based and START <= END."""
    if not text:
        return None
    parts = text.split(",")
    try:
        start, end = (int(p) for p in parts)
    except ValueError:
        raise ConfigError(
            f"--profile_steps={text!r} must be START,END (two step numbers, e.g. 10,12)."
        ) from None
    if not 1 <= start <= end:
        raise ConfigError(f"--profile_steps={text!r} needs 1 <= START <= END.")
    return start, end


class StepProfiler:
    """Starts and stops a trace around steps [start, end] of a run (a no-op without steps)."""

    def __init__(self, workdir: str, steps: tuple[int, int] | None) -> None:
        self.directory = paths.join(workdir, PROFILE_DIR)
        self._mirror: paths.LocalMirror | None = None
        self.steps = steps
        self.active = False

    def before(self, step: int) -> None:
        """Called before 1-based step `step` is dispatched."""
        if self.steps is not None and step == self.steps[0] and not self.active:
            self._mirror = paths.LocalMirror(self.directory)
            jax.profiler.start_trace(self._mirror.local)
            self.active = True

    def after(self, step: int, outputs: Any) -> None:
        """Called after step `step` was dispatched with its outputs; ends the trace at END."""
        if self.active and self.steps is not None and step >= self.steps[1]:
            self.stop(outputs)

    def stop(self, outputs: Any = None) -> None:
        if self.active:
            jax.block_until_ready(outputs)
            jax.profiler.stop_trace()
            self.active = False
            assert self._mirror is not None
            try:
                self._mirror.push("")
            finally:
                self._mirror.close()
            if jax.process_index() == 0:
                print(f"hmem_jax: profile of steps {self.steps} in {self.directory}", flush=True)
