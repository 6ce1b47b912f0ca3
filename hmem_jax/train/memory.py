"""The memory side of a training step: fetch the step's blocks, build each sequence's memory,
update the fetched blocks with sparse AdamW and write them back (DESIGN.md decisions 1-4).

The loader hands each step, per level l, the unique block ids of the global
batch (`block_ids_l{l}`, static capacity, padded) and every sequence's slot
in them (`block_slots_l{l}`). Gradients flow from each sequence's memory,
through the gather, to the unique blocks only; blocks not fetched are not
read, not written, and their moments and counts stay as they were.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hmem_jax.bank import device as bank_lib
from hmem_jax.bank.geometry import BankGeometry
from hmem_jax.bank.sparse_adamw import is_narrow, row_rounding_keys, sparse_adamw
from hmem_jax.config import MemoryConfig, TrainConfig
from hmem_jax.model import memory as memory_lib
from hmem_jax.train.optimizer import warmup_cosine

Array = jax.Array


def ids_key(level: int) -> str:
    return f"block_ids_l{level}"


def slots_key(level: int) -> str:
    return f"block_slots_l{level}"


def memory_schedule(cfg: MemoryConfig, total_steps: int) -> optax.Schedule:
    """The bank's own learning rate: warmup, then cosine from `lr` to `end_lr`."""
    return warmup_cosine(cfg.lr, cfg.end_lr, cfg.warmup_steps, total_steps)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Static description of a run's memory; its methods run inside the jitted step."""

    geometry: BankGeometry
    config: MemoryConfig
    num_layers: int
    seed: int

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "MemoryPlan | None":
        if not cfg.memory.enabled:
            return None
        return cls(BankGeometry.from_configs(cfg.model, cfg.memory, cfg.hierarchy), cfg.memory,
                   cfg.model.num_layers, cfg.seed)

    @property
    def levels(self) -> tuple[int, ...]:
        return self.geometry.active_levels

    @property
    def with_generic(self) -> bool:
        return self.config.generic_probability > 0

    @property
    def lora_scale(self) -> float:
        return self.config.lora_alpha / self.geometry.fetched_rank

    def batch_keys(self) -> tuple[str, ...]:
        """The loader's per-sequence keys this plan reads (sliced with the batch)."""
        return tuple(slots_key(l) for l in self.levels)

    def replicated_keys(self) -> tuple[str, ...]:
        """The loader's per-step keys (the same on every process)."""
        return tuple(ids_key(l) for l in self.levels)

    def init_bank(self) -> dict[str, bank_lib.LevelBank]:
        return bank_lib.init_bank(self.geometry, self.config.init_seed,
                                  jnp.dtype(self.config.bank_dtype),
                                  jnp.dtype(self.config.moment_dtype), self.with_generic)

    # ----- inside the step ----------------------------------------------------------------

    def step_ids(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """level key -> the block ids a step fetches (the generic block is id 0 of its own bank)."""
        ids = {bank_lib.level_key(l): batch[ids_key(l)] for l in self.levels}
        if self.with_generic:
            ids[bank_lib.GENERIC] = np.zeros((1,), np.int32)
        return ids

    def fetch(self, bank: Mapping[str, bank_lib.LevelBank], batch: Mapping[str, Array]
              ) -> dict[str, tuple[Array, bank_lib.LevelBank]]:
        """level key -> (ids, fetched rows) from a device-resident bank."""
        return {key: (jnp.asarray(ids), bank_lib.fetch(bank[key], jnp.asarray(ids)))
                for key, ids in self.step_ids(batch).items()}

    def generic_mask(self, step: Array, batch_size: int) -> Array:
        """bool[B]: sequences that use the generic memory this step (a function of seed, step)."""
        key = jax.random.fold_in(jax.random.key(self.seed + 7919), step)
        return jax.random.bernoulli(key, self.config.generic_probability, (batch_size,))

    def model_memory(self, params: Mapping[str, Mapping[str, Array]], batch: Mapping[str, Array],
                     use_generic: Array | None) -> Any:
        """The `memory` input of the model for these sequences (leading axis: all layers)."""
        fetched = {level: params[bank_lib.level_key(level)] for level in self.levels}
        slots = {level: batch[slots_key(level)] for level in self.levels}
        generic = params.get(bank_lib.GENERIC) if use_generic is not None else None
        if self.config.application == "grouped":
            memory = memory_lib.grouped_memory(fetched, slots, generic, use_generic)
        else:
            rank_axes = {n: m.rank_axis for n, m in self.geometry.matrices.items()}
            memory = memory_lib.sequence_memory(fetched, slots, rank_axes)
            if generic is not None:
                memory = memory_lib.select_generic(memory, generic, use_generic)
        return memory_lib.place_layers(memory, self.geometry.layers, self.num_layers)

    def updated_rows(self, fetched: Mapping[str, tuple[Array, bank_lib.LevelBank]],
                     grads: Mapping[str, Mapping[str, Array]], lr: Array,
                     use_generic: Array | None, step: Array
                     ) -> dict[str, tuple[Array, bank_lib.LevelBank]]:
        """Sparse AdamW on the fetched rows: level key -> (ids, rows to write back).

        Padding rows (ids >= clusters) and an unused generic block are returned
        unchanged; writing them back is a no-op. `step` seeds the stochastic
        rounding of a narrow bank.
        """
        out = {}
        for key, (ids, rows) in fetched.items():
            if key == bank_lib.GENERIC:
                level = 0
                valid = jnp.broadcast_to(jnp.any(use_generic), ids.shape)
            else:
                level = int(key[1:])
                valid = ids < self.geometry.clusters(level)
            keys = row_rounding_keys(self.seed + 104729, step, level, ids)
            params, mu, nu, count = sparse_adamw(rows.params, grads[key], rows.mu, rows.nu,
                                                 rows.count, valid, lr, self.config, keys)
            out[key] = (ids, bank_lib.LevelBank(params=params, mu=mu, nu=nu, count=count))
        return out

    @staticmethod
    def commit(bank: Mapping[str, bank_lib.LevelBank],
               rows: Mapping[str, tuple[Array, bank_lib.LevelBank]]) -> dict[str, bank_lib.LevelBank]:
        """Write updated rows into a device-resident bank."""
        new_bank = dict(bank)
        for key, (ids, updated) in rows.items():
            new_bank[key] = bank_lib.commit(bank[key], ids, updated)
        return new_bank

    def metrics(self, fetched: Mapping[str, tuple[Array, bank_lib.LevelBank]],
                updated: Mapping[str, tuple[Array, bank_lib.LevelBank]]) -> dict[str, Array]:
        """Per step: unique blocks per level and bytes fetched; for a bank narrower than float32
        also `mem/changed_fraction`, the share of the fetched blocks' parameters whose stored
        value the update changed (near 0: the bank is losing its updates to rounding)."""
        out = {}
        fetch_bytes = jnp.zeros((), jnp.float32)
        narrow = is_narrow(self.config.bank_dtype)
        changed = total = jnp.zeros((), jnp.float32)
        for level in self.levels:
            key = bank_lib.level_key(level)
            ids, rows = fetched[key]
            valid = ids < self.geometry.clusters(level)
            unique = jnp.sum(valid)
            out[f"mem/unique_blocks_l{level}"] = unique
            row_bytes = sum(x[0].size * x.dtype.itemsize for x in rows.params.values())
            fetch_bytes = fetch_bytes + unique * row_bytes
            for name, before in rows.params.items() if narrow else ():
                moved = updated[key][1].params[name] != before
                per_row = moved.reshape(moved.shape[0], -1).sum(axis=1)
                changed = changed + jnp.sum(jnp.where(valid, per_row, 0))
                total = total + unique * before[0].size
        out["mem/fetch_bytes"] = fetch_bytes
        if narrow:
            out["mem/changed_fraction"] = changed / jnp.maximum(total, 1.0)
        return out
