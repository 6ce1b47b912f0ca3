"""Orbax checkpoints of the train state under `WORKDIR/checkpoints/<step>/`.

Each checkpoint holds the sharded train state and a small JSON record of what
produced it (config fingerprint, data manifest fingerprint, step). Saves are
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

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import orbax.checkpoint as ocp

from hmem_jax.errors import CheckpointMismatchError
from hmem_jax.train.state import TrainState


class Checkpointer:
    """Saves every `every` steps, keeps the last `keep`, restores the latest."""

    def __init__(
        self,
        directory: str,
        every: int,
        keep: int,
        async_save: bool = True,
        bank_snapshot: Callable[[int], dict[str, Any]] | None = None,
        bank_collect: Callable[[Iterable[int]], Any] | None = None,
    ) -> None:
        """`bank_snapshot(step)` seals a streamed bank and returns what the record keeps of it;
        `bank_collect(steps)` drops bank versions not in `steps` (the kept checkpoints)."""
        self.directory = os.path.abspath(directory)
        self._bank_snapshot, self._bank_collect = bank_snapshot, bank_collect
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=every,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self.last_blocking_s = 0.0

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(
        self, step: int, state: TrainState, record: dict[str, Any], force: bool = False
    ) -> bool:
        """Start saving `state` as checkpoint `step` if the interval (or `force`) says so."""
        start = time.perf_counter()
        if self._bank_snapshot is not None:
            if not (force or self._manager.should_save(step)):
                return False
            # The bank version is durable before orbax starts: a checkpoint never names a
            # bank that is not fully on disk.
            record = {**record, **self._bank_snapshot(step)}
        saved = self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)
            ),
            force=force,
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

    def check_record(self, step: int, expected: dict[str, Any]) -> None:
        """Raise CheckpointMismatchError naming the first of `expected`'s fingerprints (e.g. the
        model config) that differs from checkpoint `step`'s record."""
        record = self.read_record(step)
        for key, value in expected.items():
            if record.get(key) != value:
                raise CheckpointMismatchError(
                    f"Checkpoint {self.directory}/{step} was written with {key} = "
                    f"{record.get(key)!r}, but this run has {value!r}. Resume with the original "
                    f"configuration, or start the new run in a fresh --workdir."
                )

    def restore(self, step: int, target: TrainState, expected: dict[str, Any]) -> TrainState:
        """Restore `step` into the layout of `target` (ShapeDtypeStructs with shardings), after
        `check_record(step, expected)`: never a silent restore into a different run."""
        self.check_record(step, expected)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
        return restored["state"]

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

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
