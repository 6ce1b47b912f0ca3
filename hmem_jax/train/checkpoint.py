"""Orbax checkpoints of the train state under `WORKDIR/checkpoints/<step>/`.

Each checkpoint holds the sharded train state and a small JSON record of what
produced it (every config field and the prepared data's fingerprint: train/resume.py). Saves are
asynchronous: the host copies device buffers and goes on while the write
proceeds; orbax finalises a step folder only when all of it is on disk, so a
crash mid-write leaves the previous checkpoint as the latest.

A streamed bank (hmem_jax/bank/streaming.py) lives outside the state. Before
each save the bank is sealed as an immutable store version and its id goes
into the checkpoint's record, so checkpoint s names exactly the bank of step
s; after the save, store versions and blocks that no kept checkpoint names
are collected (docs/bank.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import orbax.checkpoint as ocp

from hmem_jax import paths
from hmem_jax.errors import CheckpointMismatchError, CheckpointSaveError, HmemError
from hmem_jax.train import orbax_storage
from hmem_jax.train.state import TrainState


def _ignore_abandoned_reads() -> None:
    """A failed orbax restore closes its event loop while tensorstore reads of the same
    checkpoint are still in flight; their completions then report 'Event loop is closed' as
    unraisable errors. Those reads belong to a checkpoint already given up: drop just them."""
    previous = sys.unraisablehook
    if getattr(previous, "hmem_ignores_abandoned_reads", False):
        return

    def hook(unraisable: Any) -> None:
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            previous(unraisable)

    hook.hmem_ignores_abandoned_reads = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _first_line(err: BaseException, limit: int = 240) -> str:
    """An error's first line for a one-line message (its end, where I/O errors say what failed,
    if it is long); the error's type if it has no text."""
    lines = str(err).strip().splitlines()
    if not lines:
        return type(err).__name__
    return lines[0] if len(lines[0]) <= limit else "..." + lines[0][-limit:]


def _save_failure(err: BaseException) -> str:
    """Why a write failed, in words: the operating system's reason first (tensorstore reports
    it only as `os_error_code='27'` inside a long spec), then the error's line."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return f"{os.strerror(seen.errno)}: {_first_line(seen, 160)}"
        seen = seen.__cause__ or seen.__context__
    code = re.search(r"os_error_code='?(\d+)", str(err))
    if code:
        return f"{os.strerror(int(code.group(1)))}: {_first_line(err, 160)}"
    return _first_line(err)


def _never_retrieved(record: logging.LogRecord) -> bool:
    return "exception was never retrieved" not in record.getMessage()


def _ignore_abandoned_writes() -> None:
    """After a failed save, orbax's other write futures of that checkpoint fail too and asyncio
    reports each 'exception was never retrieved' at exit; the run already said why it stopped."""
    logger = logging.getLogger("asyncio")
    if _never_retrieved not in logger.filters:
        logger.addFilter(_never_retrieved)


def _processes(this_process_only: bool) -> ocp.options.MultiprocessingOptions:
    """All processes (orbax's default), or only this one, primary for itself."""
    if not this_process_only:
        return ocp.options.MultiprocessingOptions()
    import jax

    me = jax.process_index()
    return ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"reader{me}"
    )


class Checkpointer:
    """Saves every `every` steps (or seconds), keeps the last `keep`, restores the latest."""

    def __init__(
        self,
        directory: str,
        every: int,
        keep: int,
        async_save: bool = True,
        bank_snapshot: Callable[[int], dict[str, Any]] | None = None,
        bank_collect: Callable[[Iterable[int]], Any] | None = None,
        every_s: int = 0,
        this_process_only: bool = False,
    ) -> None:
        """`bank_snapshot(step)` seals a streamed bank and returns what the record keeps of it;
        `bank_collect(steps)` drops bank versions not in `steps` (the kept checkpoints).

        Every process of a job opens a checkpointer together (orbax synchronises them), except
        with `this_process_only`: a reader that one process opens on its own, e.g. to probe or
        evaluate a run after training while the job's other processes do not follow.

        Saves every `every` steps and, with `every_s` > 0, also once `every_s` seconds have
        passed since the last checkpoint (orbax's continuous policy: process 0 decides and
        every process follows, so all save the same step; never while a save is running).
        """
        self.directory = paths.absolute(directory)
        orbax_storage.prepare(self.directory)  # s3:// through tensorstore's s3 driver
        self._bank_snapshot, self._bank_collect = bank_snapshot, bank_collect
        policies = ocp.checkpoint_managers
        # Explicit, so there is no save at a fresh run's first step (orbax's default adds one).
        decisions: list[Any] = [
            policies.FixedIntervalPolicy(every),
            policies.PreemptionCheckpointingPolicy(),
        ]
        if every_s > 0:
            decisions.append(policies.ContinuousCheckpointingPolicy(minimum_interval_secs=every_s))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=every,
            create=not this_process_only,  # a reader needs the folder to be there already
            enable_async_checkpointing=async_save,
            save_decision_policy=policies.AnySavePolicy(decisions),
            atomicity_options=orbax_storage.atomicity_options(self.directory),
            multiprocessing_options=_processes(this_process_only),
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self.last_blocking_s = 0.0
        self._save_failed = False
        _ignore_abandoned_reads()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(
        self, step: int, state: TrainState, record: dict[str, Any], force: bool = False
    ) -> bool:
        """Start saving `state` as checkpoint `step` if the interval (or `force`) says so.

        Raises CheckpointSaveError as soon as an earlier (asynchronous) save is known to have
        failed, so a run never trains on past a checkpoint it could not write.
        """
        with self._saving():
            self._manager.check_for_errors()
        if not (force or self._manager.should_save(step)):
            return False
        start = time.perf_counter()
        if self._bank_snapshot is not None:
            # The bank version is durable before orbax starts: a checkpoint never names a
            # bank that is not fully on disk.
            record = {**record, **self._bank_snapshot(step)}
        with self._saving():
            saved = self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)
                ),
                force=True,
            )
        if saved and self._bank_collect is not None:
            self._bank_collect(set(self.all_steps()) | {step})
        self.last_blocking_s = time.perf_counter() - start
        return bool(saved)

    def read_record(self, step: int) -> dict[str, Any]:
        """The JSON record saved with checkpoint `step`."""
        return dict(
            self._manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))[
                "record"
            ]
        )

    def newest_record(self) -> tuple[int, dict[str, Any]] | None:
        """(step, record) of the newest checkpoint whose record reads; None if there is none."""
        for step in sorted(self.all_steps(), reverse=True):
            try:
                return step, self.read_record(step)
            except Exception:  # a damaged checkpoint: `restore_newest` names it
                continue
        return None

    def restore_newest(
        self,
        target: TrainState,
        check: Callable[[int, dict[str, Any]], None] | None = None,
        on_record: Callable[[int, dict[str, Any]], None] | None = None,
        steps: Iterable[int] | None = None,
    ) -> tuple[int, TrainState, list[int]]:
        """Restore the newest readable of `steps` (default: every checkpoint) -> (step, state,
        the newer steps skipped as unreadable, each named in a warning).

        A checkpoint whose files are damaged (truncated, missing, not a checkpoint) is
        skipped for the next older one. `check(step, record)` raises if this run may not
        resume that checkpoint (an HmemError such as CheckpointMismatchError, never skipped);
        `on_record(step, record)` runs before the state of that step is read (a streamed bank
        points itself at the step's version).
        """
        order = sorted(self.all_steps() if steps is None else steps, reverse=True)
        skipped: list[int] = []
        _ignore_abandoned_reads()
        for step in order:
            try:
                record = self.read_record(step)
                if check is not None:
                    check(step, record)
                if on_record is not None:
                    on_record(step, record)
                restored = self._manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
                )
            except HmemError:
                raise
            except Exception as err:  # damaged files raise many kinds of error
                reason = f"{type(err).__name__}: {_first_line(err)}"
                print(
                    f"hmem_jax: warning: checkpoint {self.directory}/{step} cannot be read "
                    f"({reason}); trying the previous one",
                    file=sys.stderr,
                    flush=True,
                )
                skipped.append(step)
                continue
            return step, restored["state"], skipped
        raise CheckpointMismatchError(
            f"No checkpoint in {self.directory} can be read (steps {order}, warnings above). "
            "Move the folder aside to start the run afresh, or restore it from a copy."
        )

    def set_aside(self, steps: Iterable[int]) -> list[str]:
        """Rename unreadable step folders to `<step>.unreadable` (kept byte for byte, ignored
        from now on), so the run can write those steps again; returns the new names."""
        moved = []
        for step in steps:
            source = paths.join(self.directory, str(step))
            target, n = f"{source}.unreadable", 1
            while paths.exists(target):
                target, n = f"{source}.unreadable{n}", n + 1
            paths.rename(source, target)
            moved.append(target)
        self.reload()
        return moved

    def reload(self) -> None:
        """Re-read the step folders on disk (after another process changed them)."""
        self._manager.reload()

    def restore_params(self, step: int, target: Any) -> Any:
        """Only the model parameters of checkpoint `step`, into `target`'s layout.

        Used to start co-training or a frozen-anchor run from an anchor run:
        its optimizer state (and any bank) is left on disk.
        """
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        item={"params": target},
                        restore_args={"params": restore_args},
                        partial_restore=True,
                    )
                ),
            )
        except (ValueError, KeyError) as err:
            raise CheckpointMismatchError(
                f"The anchor in {self.directory}/{step} does not fit this model ({err}). "
                "init_from must name a run of the same ModelConfig."
            ) from err
        return restored["state"]["params"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    @contextlib.contextmanager
    def _saving(self) -> Iterator[None]:
        """Turn a failed write into one CheckpointSaveError naming the last good checkpoint."""
        try:
            yield
        except HmemError:
            raise
        except Exception as err:  # I/O errors reach here in several wrappings
            self._save_failed = True
            _ignore_abandoned_writes()
            reason = _save_failure(err)
            good = self._complete_steps()
            raise CheckpointSaveError(
                f"Writing a checkpoint under {self.directory} failed ({reason}). "
                f"The newest "
                f"complete checkpoint is step {max(good) if good else 'none'}; free space there "
                "(or lower TrainConfig.keep_checkpoints) and rerun the same command to resume."
            ) from err

    def _complete_steps(self) -> list[int]:
        self._manager.reload()
        return list(self._manager.all_steps())

    def close(self) -> None:
        """Wait for the last save (its failure is a CheckpointSaveError) and release."""
        try:
            if not self._save_failed:
                with self._saving():
                    self._manager.wait_until_finished()
        finally:
            try:
                self._manager.close()
            except Exception:
                if not self._save_failed:
                    raise
