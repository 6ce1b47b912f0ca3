"""The bank tiers behind one interface: what the training loop asks of a bank, whatever its tier.

Per step the loop asks the tier for the step's rows (`rows`: None when the bank lives in the
train state), hands it what the step returned (`finish`), and at checkpoints lets it seal the
bank (`snapshot`) or point it back at a sealed version (`restore`). `train/loop.py` calls these
without knowing which tier it drives.

- `DeviceTier` (`MemoryConfig.bank_tier = 'device'`): the bank is part of `TrainState` (every
  block split over the devices, `bank/exchange.py`); the orbax checkpoint holds it, and every
  per-step method does nothing.
- `StreamedTier` (`'streaming'`): the bank lives in a tensorstore store behind a host cache
  (`bank/streaming.py`). Each step's rows (params, moments, counts of the global batch's
  distinct blocks) are laid out like the device tier's bank, every block split over the
  devices; each process assembles only its own devices' slices (`bank/parts.py`), places them
  on the mesh, donates them to the step and takes its slices of the updated rows back. The
  tier holds no reference to a step's rows once the step owns them, so host memory per step is
  one copy of this process's part of the fetched rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from hmem_jax import sharding
from hmem_jax.bank import device as bank_lib
from hmem_jax.bank.device import GENERIC
from hmem_jax.bank.exchange import BlockExchange
from hmem_jax.bank.layout import kvstore_spec
from hmem_jax.bank.parts import from_global, to_global
from hmem_jax.bank.store import BankMismatchError
from hmem_jax.bank.streaming import StreamedBank, from_level_bank, open_streamed_bank, to_level_bank
from hmem_jax.config import TrainConfig
from hmem_jax.data.batch import block_ids_key
from hmem_jax.train.memory import MemoryPlan


class DeviceTier:
    """The bank is in the train state: nothing to fetch, write back or seal per step."""

    in_state = True
    lookahead = 0
    store_spec: dict[str, Any] | None = None

    def restore(self, record: Mapping[str, Any], where: str) -> None:
        if "bank_version" in record:
            raise BankMismatchError(
                f"Checkpoint {where} was written with a streamed bank "
                "(MemoryConfig.bank_tier = 'streaming'); resume with that tier."
            )

    def checkpoint_hooks(self) -> tuple[Callable | None, Callable | None]:
        """(seal the bank at a step -> record entries, drop versions not in steps)."""
        return None, None

    def rows(self, local_batch: Mapping[str, Any]) -> None:
        return None

    def finish(self, rows_out: Any, ahead: Sequence[Mapping[str, Any]]) -> None:
        del rows_out, ahead

    def metrics(self, steps: int) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


class StreamedTier:
    """A streamed bank's part of each step: rows before it, updated rows after it."""

    in_state = False

    def __init__(
        self,
        bank: StreamedBank,
        plan: MemoryPlan,
        mesh: jax.sharding.Mesh,
        rules: Any,
        exchange: BlockExchange,
    ) -> None:
        self.bank, self.plan = bank, plan
        self._mesh, self._rules, self._exchange = mesh, rules, exchange
        self._replicated = sharding.replicated(mesh)
        self._counts: dict[str, np.ndarray] = {}
        self._ids: dict[str, np.ndarray] = {}

    @property
    def lookahead(self) -> int:
        """How many future batches `finish` must see (prefetch and write-back)."""
        return max(self.bank.prefetch_steps, 1)

    @property
    def store_spec(self) -> dict[str, Any]:
        return self.bank.store.spec

    def restore(self, record: Mapping[str, Any], where: str) -> None:
        """Point the bank at the version checkpoint `where` recorded."""
        if "bank_version" not in record:
            raise BankMismatchError(
                f"Checkpoint {where} holds a device-resident bank, but this run has "
                "MemoryConfig.bank_tier = 'streaming'; resume with bank_tier = 'device', or "
                "start the streamed run in a fresh --workdir."
            )
        if record.get("bank_uid") != self.bank.store.uid:
            raise BankMismatchError(
                f"Checkpoint {where} names bank {record.get('bank_uid')}, but "
                f"MemoryConfig.bank_store points at bank {self.bank.store.uid} "
                f"({self.bank.store.where}); point it at the run's own bank."
            )
        self.bank.restore(int(record["bank_version"]))

    def checkpoint_hooks(
        self,
    ) -> tuple[Callable[[int], dict], Callable[[Iterable[int]], Any] | None]:
        """Seal the bank with each checkpoint; process 0 drops versions no checkpoint keeps."""
        collect = self.bank.store.collect_garbage if jax.process_index() == 0 else None
        return self.bank.snapshot, collect

    def _positions(self, local_batch: Mapping[str, Any], key: str, union: np.ndarray) -> np.ndarray:
        """This process's shards' block ids as positions in the step's rows (padding: len)."""
        if key == GENERIC:
            shards = local_batch[block_ids_key(self.plan.levels[0])].shape[0]
            return np.zeros((shards, 1), np.int32)
        ids = np.asarray(local_batch[block_ids_key(int(key[1:]))])
        positions = np.searchsorted(union, ids).astype(np.int32)
        return np.where(ids < self.bank.store.layouts[key].clusters, positions, len(union)).astype(
            np.int32
        )

    def _place(self, key: str, rows: bank_lib.LevelBank) -> bank_lib.LevelBank:
        """This process's part of a level's rows -> the step's view leaves on the mesh."""
        placed = {}
        for field, part in from_level_bank(rows).items():
            shape = (part.shape[0],) + self.bank.store.layouts[key].fields[field][0]
            where = NamedSharding(self._mesh, self._exchange.spec(shape))
            placed[field] = to_global(part, self.bank.parts[key][field].held, shape, where)
        return to_level_bank(placed)

    def _take(self, key: str, rows: bank_lib.LevelBank) -> bank_lib.LevelBank:
        """This process's part of a level's updated rows (its devices' slices; no transfer)."""
        return to_level_bank(
            {
                field: from_global(x, self.bank.parts[key][field].held)
                for field, x in from_level_bank(rows, convert=None).items()
            }
        )

    def rows(self, local_batch: Mapping[str, Any]) -> dict[str, tuple]:
        """The step's views: (each shard's positions in the rows, the rows laid out like the
        device bank, their block ids), to be donated to the step."""
        fetched = self.bank.fetch(self.plan.host_ids(local_batch))
        self._counts = {key: np.array(rows.count) for key, (_, rows) in fetched.items()}
        self._ids = {key: np.asarray(ids) for key, (ids, _) in fetched.items()}
        views = {}
        for key, (union, rows) in fetched.items():
            positions = sharding.global_batch(
                {"p": self._positions(local_batch, key, union)}, self._mesh, self._rules
            )["p"]
            ids = jax.make_array_from_process_local_data(self._replicated, np.asarray(union))
            views[key] = (positions, self._place(key, rows), ids)
        return views

    def finish(
        self, rows_out: Mapping[str, Any] | None, ahead: Sequence[Mapping[str, Any]]
    ) -> None:
        """Start reading the next steps' blocks, then hand the updated rows to the bank.

        Called right after the step is dispatched: the prefetch overlaps the
        step's compute, and reading `rows_out` waits for the step.
        """
        assert rows_out is not None, "a host bank's step returns its updated rows"
        upcoming = [self.plan.host_ids(b) for b in ahead]
        if self.bank.prefetch_steps:
            self.bank.prefetch(upcoming)
        updated = {key: (self._ids[key], self._take(key, rows)) for key, rows in rows_out.items()}
        self.bank.commit(updated, self._counts, upcoming)
        self._counts, self._ids = {}, {}

    def metrics(self, steps: int) -> dict[str, float]:
        """Cache and store counters since the last call; fetch wait per step."""
        out = self.bank.metrics()
        out["mem/fetch_wait_s"] /= max(steps, 1)
        return out

    def close(self) -> None:
        self.bank.close()


def open_tier(
    cfg: TrainConfig, plan: MemoryPlan | None, workdir: str, mesh: jax.sharding.Mesh, rules: Any
) -> DeviceTier | StreamedTier:
    """The run's bank tier; a run without memory gets the (empty) device tier."""
    if plan is None or cfg.memory.bank_tier != "streaming":
        return DeviceTier()
    spec = kvstore_spec(cfg.memory.bank_store, workdir)
    exchange = BlockExchange.for_mesh(mesh, rules)
    bank = open_streamed_bank(spec, plan, jax.process_index(), jax.process_count(), exchange)
    return StreamedTier(bank, plan, mesh, rules, exchange)
