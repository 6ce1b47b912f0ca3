"""The streamed bank's part of a training step: rows fetched before it, updated rows after it.

With `MemoryConfig.bank_tier = 'streaming'` the bank is not in the train
state: each step's rows (params, moments, counts of the step's unique blocks)
are assembled on the host by `StreamedBank`, placed on the mesh replicated,
donated to the step and come back updated. This object keeps the training
loop free of the tier's details and holds no reference to a step's rows once
the step owns them, so host memory per step is one copy of the fetched rows
(the step's output reuses the donated input buffers and the cache keeps views
of it, not copies).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from hmem_jax import sharding
from hmem_jax.bank.layout import kvstore_spec
from hmem_jax.bank.streaming import StreamedBank, open_streamed_bank
from hmem_jax.config import TrainConfig
from hmem_jax.bank.device import GENERIC
from hmem_jax.train.memory import MemoryPlan, ids_key


class BankMismatch(RuntimeError):
    """A checkpoint's bank is not the bank this run streams from."""


def open_bank(cfg: TrainConfig, plan: MemoryPlan | None, workdir: str) -> StreamedBank | None:
    """The run's streamed bank (`MemoryConfig.bank_store`, default WORKDIR/bank), or None."""
    if plan is None or cfg.memory.bank_tier != "streaming":
        return None
    spec = kvstore_spec(cfg.memory.bank_store, workdir)
    return open_streamed_bank(spec, plan, jax.process_index(), jax.process_count())


def restore_bank(bank: StreamedBank | None, record: dict[str, Any], where: str) -> None:
    """Point the streamed bank at the version checkpoint `where` recorded."""
    if bank is None:
        if "bank_version" in record:
            raise BankMismatch(f"Checkpoint {where} was written with a streamed bank "
                               f"(MemoryConfig.bank_tier = 'streaming'); resume with that tier.")
        return
    if "bank_version" not in record:
        raise BankMismatch(f"Checkpoint {where} holds a device-resident bank, but this run has "
                           "MemoryConfig.bank_tier = 'streaming'; resume with bank_tier = "
                           "'device', or start the streamed run in a fresh --workdir.")
    if record.get("bank_uid") != bank.store.uid:
        raise BankMismatch(f"Checkpoint {where} names bank {record.get('bank_uid')}, but "
                           f"MemoryConfig.bank_store points at bank {bank.store.uid} "
                           f"({bank.store.where}); point it at the run's own bank.")
    bank.restore(int(record["bank_version"]))


def _local_replica(x: jax.Array) -> np.ndarray:
    """This process's copy of a replicated array (no transfer, no cross-process gather)."""
    return np.asarray(x.addressable_data(0))


class StreamedRows:
    """rows(batch) before the step, finish(rows out, next batches) after it."""

    def __init__(self, bank: StreamedBank, plan: MemoryPlan, mesh: jax.sharding.Mesh,
                 rules: Any) -> None:
        self.bank, self.plan = bank, plan
        self._mesh, self._rules = mesh, rules
        self._replicated = sharding.replicated(mesh)
        self._counts: dict[str, np.ndarray] = {}
        self._ids: dict[str, np.ndarray] = {}

    @property
    def lookahead(self) -> int:
        """How many future batches the loop must show `finish` (prefetch and write-back)."""
        return max(self.bank.prefetch_steps, 1)

    def _positions(self, local_batch: Mapping[str, Any], key: str, union: np.ndarray
                   ) -> np.ndarray:
        """This process's shards' block ids as positions in the step's rows (padding: len)."""
        if key == GENERIC:
            shards = local_batch[ids_key(self.plan.levels[0])].shape[0]
            return np.zeros((shards, 1), np.int32)
        ids = np.asarray(local_batch[ids_key(int(key[1:]))])
        positions = np.searchsorted(union, ids).astype(np.int32)
        return np.where(ids < self.bank.store.layouts[key].clusters, positions,
                        len(union)).astype(np.int32)

    def rows(self, local_batch: Mapping[str, Any]) -> Any:
        """The step's views: (each shard's positions in the rows, the rows (replicated), their
        block ids), to be donated to the step."""
        fetched = self.bank.fetch(self.plan.host_ids(local_batch))
        self._counts = {key: np.array(rows.count) for key, (_, rows) in fetched.items()}
        self._ids = {key: np.asarray(ids) for key, (ids, _) in fetched.items()}
        views = {}
        for key, (union, rows) in fetched.items():
            place = lambda x: jax.make_array_from_process_local_data(  # noqa: E731
                self._replicated, x, x.shape)
            positions = sharding.global_batch({"p": self._positions(local_batch, key, union)},
                                              self._mesh, self._rules)["p"]
            views[key] = (positions, jax.tree.map(place, rows), place(np.asarray(union)))
        return views

    def finish(self, rows_out: Any, ahead: Sequence[Mapping[str, Any]]) -> None:
        """Start reading the next steps' blocks, then hand the updated rows to the bank.

        Called right after the step is dispatched: the prefetch overlaps the
        step's compute, and reading `rows_out` waits for the step.
        """
        upcoming = [self.plan.host_ids(b) for b in ahead]
        if self.bank.prefetch_steps:
            self.bank.prefetch(upcoming)
        updated = {key: (self._ids[key], jax.tree.map(_local_replica, rows))
                   for key, rows in rows_out.items()}
        self.bank.commit(updated, self._counts, upcoming)
        self._counts, self._ids = {}, {}

    def metrics(self, steps: int) -> dict[str, float]:
        """Cache and store counters since the last call; fetch wait per step."""
        out = self.bank.metrics()
        out["mem/fetch_wait_s"] /= max(steps, 1)
        return out
