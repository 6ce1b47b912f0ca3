"""The memory side of a training step: fetch each batch shard's blocks, build each sequence's
memory, sum the gradients of blocks several shards share, update them with sparse AdamW where
they live (docs/design.md decisions 1, 3, 4 and 15).

The loader hands each step, per level l, every batch shard's unique block ids
(`block_ids_l{l}`, [S, C], static capacity, padded) and every sequence's slot
in its own shard's row (`block_slots_l{l}`); `data/batch.py` defines the keys.
A bank tier gives the step a *view* per level: the blocks it can read (the
device tier's whole bank, or a host tier's rows of the step) and, per shard,
the ids of its blocks in that view. The movement between the view's slices and the shards is
`bank.exchange.BlockExchange`. Blocks not fetched are not read, not written,
and their moments and counts stay as they were.
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
from hmem_jax.bank.exchange import BlockExchange, Reduced
from hmem_jax.bank.geometry import BankGeometry
from hmem_jax.bank.sparse_adamw import element_counters, is_narrow, row_rounding_keys, sparse_adamw
from hmem_jax.config import MemoryConfig, TrainConfig
from hmem_jax.data.batch import block_ids_key, block_slots_key, block_union_key
from hmem_jax.model import memory as memory_lib
from hmem_jax.train.optimizer import warmup_cosine

Array = jax.Array


# (ids int32[S, C] into the view, the view's blocks, the block id of each view row or None when
# row i is block i)
View = tuple[Any, bank_lib.LevelBank, Any]


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
    def from_config(cls, cfg: TrainConfig) -> MemoryPlan | None:
        if not cfg.memory.enabled:
            return None
        return cls(
            BankGeometry.from_configs(cfg.model, cfg.memory, cfg.hierarchy),
            cfg.memory,
            cfg.model.num_layers,
            cfg.seed,
        )

    @property
    def levels(self) -> tuple[int, ...]:
        return self.geometry.active_levels

    @property
    def with_generic(self) -> bool:
        return self.config.generic_probability > 0

    @property
    def lora_scale(self) -> float:
        return self.config.lora_alpha / self.geometry.fetched_rank

    def sequence_keys(self) -> tuple[str, ...]:
        """The loader's per-sequence keys the step reads (sliced with the batch)."""
        return tuple(block_slots_key(l) for l in self.levels)

    def batch_keys(self) -> tuple[str, ...]:
        """Every loader key the step reads, all split over the batch shards: the per-sequence
        slots and the per-shard block ids."""
        return self.sequence_keys() + tuple(block_ids_key(l) for l in self.levels)

    def host_ids(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """level key -> the step's distinct block ids over the global batch (what a host tier
        reads; the generic block is id 0 of its own bank)."""
        ids = {bank_lib.level_key(l): np.asarray(batch[block_union_key(l)]) for l in self.levels}
        if self.with_generic:
            ids[bank_lib.GENERIC] = np.zeros((1,), np.int32)
        return ids

    def init_bank(self) -> dict[str, bank_lib.LevelBank]:
        return bank_lib.init_bank(
            self.geometry,
            self.config.init_seed,
            jnp.dtype(self.config.bank_dtype),
            jnp.dtype(self.config.moment_dtype),
            self.with_generic,
        )

    # ----- inside the step ----------------------------------------------------------------

    def _shards(self, batch: Mapping[str, Any]) -> int:
        return batch[block_ids_key(self.levels[0])].shape[0]

    def device_views(
        self, bank: Mapping[str, bank_lib.LevelBank], batch: Mapping[str, Array]
    ) -> dict[str, View]:
        """The device tier's views: the whole bank, addressed by global block ids."""
        views = {
            bank_lib.level_key(l): (batch[block_ids_key(l)], bank[bank_lib.level_key(l)], None)
            for l in self.levels
        }
        if self.with_generic:
            generic = jnp.zeros((self._shards(batch), 1), jnp.int32)
            views[bank_lib.GENERIC] = (generic, bank[bank_lib.GENERIC], None)
        return views

    def fetch(self, exchange: BlockExchange, views: Mapping[str, View]) -> dict[str, Any]:
        """level key -> each shard's blocks {name: [S, C, layers, ...]}."""
        return {key: exchange.fetch(view.params, ids) for key, (ids, view, _) in views.items()}

    def generic_mask(self, step: Array, batch_size: int) -> Array:
        """bool[B]: sequences that use the generic memory this step (a function of seed, step)."""
        key = jax.random.fold_in(jax.random.key(self.seed + 7919), step)
        return jax.random.bernoulli(key, self.config.generic_probability, (batch_size,))

    def model_memory(
        self,
        params: Mapping[str, Mapping[str, Array]],
        batch: Mapping[str, Array],
        use_generic: Array | None,
    ) -> Any:
        """The `memory` input of the model for these sequences (leading axis: all layers).

        params[key][name]: [S, C, layers, ...], shard s's blocks; the batch's rows are the
        shards' rows in order, so sequence i belongs to shard i // (b / S).
        """
        fetched = {level: params[bank_lib.level_key(level)] for level in self.levels}
        slots = {level: batch[block_slots_key(level)] for level in self.levels}
        generic = params.get(bank_lib.GENERIC) if use_generic is not None else None
        build = self._grouped if self.config.application == "grouped" else self._gathered
        memory = build(fetched, slots, generic, use_generic)
        return memory_lib.place_layers(memory, self.geometry.layers, self.num_layers)

    @staticmethod
    def _grouped(fetched: dict, slots: dict, generic: Any, use_generic: Any) -> dict:
        """All shards' blocks as one list per level, each sequence's slot offset by its shard."""
        shards = jax.tree.leaves(fetched)[0].shape[0]
        rows = next(iter(slots.values())).shape[0]
        shard_of_row = jnp.arange(rows) // (rows // shards)
        flat, global_slots = {}, {}
        for level, blocks in fetched.items():
            capacity = jax.tree.leaves(blocks)[0].shape[1]
            flat[level] = {n: x.reshape((-1,) + x.shape[2:]) for n, x in blocks.items()}
            global_slots[level] = slots[level] + shard_of_row * capacity
        shared = None if generic is None else {n: x[0] for n, x in generic.items()}
        return memory_lib.grouped_memory(flat, global_slots, shared, use_generic)

    def _gathered(self, fetched: dict, slots: dict, generic: Any, use_generic: Any) -> dict:
        """Per-sequence weights built shard by shard from the shard's own blocks."""
        shards = jax.tree.leaves(fetched)[0].shape[0]
        rows = next(iter(slots.values())).shape[0]
        rank_axes = self.geometry.rank_axes

        def one_shard(blocks: dict, shard_slots: dict, shard_generic: Any, shard_use: Any) -> dict:
            memory = memory_lib.sequence_memory(blocks, shard_slots, rank_axes)
            if shard_generic is not None:
                memory = memory_lib.select_generic(memory, shard_generic, shard_use)
            return memory

        split = lambda x: x.reshape((shards, -1) + x.shape[1:])  # noqa: E731
        use = None if generic is None else split(use_generic)
        per_shard = jax.vmap(one_shard)(
            fetched, {l: split(s) for l, s in slots.items()}, generic, use
        )  # [S, layers, b/S, ...]
        return jax.tree.map(
            lambda x: jnp.swapaxes(x, 0, 1).reshape((x.shape[1], rows) + x.shape[3:]), per_shard
        )

    def reduce(
        self,
        exchange: BlockExchange,
        views: Mapping[str, View],
        grads: Mapping[str, Mapping[str, Array]],
    ) -> dict[str, Reduced]:
        """level key -> the fetched blocks' gradients summed over the shards that used them."""
        return {
            key: exchange.reduce(grads[key], ids, view.count.shape[0], view.params)
            for key, (ids, view, _) in views.items()
        }

    def update(
        self,
        exchange: BlockExchange,
        views: Mapping[str, View],
        reduced: Mapping[str, Reduced],
        lr: Array,
        scale: Array,
        use_generic: Array | None,
        step: Array,
    ) -> tuple[dict[str, bank_lib.LevelBank], dict[str, Array]]:
        """Sparse AdamW (gradients times `scale`, the clip factor) on every view's blocks of
        the step -> (new views, the level's update metrics).

        Padding ids and an unused generic block are left as they were. `step`
        seeds the stochastic rounding of a narrow bank. Metrics: distinct blocks per level,
        and for a bank narrower than float32 `mem/changed_fraction`, the share of the updated
        blocks' parameters whose stored value the update changed (near 0: the bank is losing
        its updates to rounding).
        """
        new_views, metrics = {}, {}
        narrow = is_narrow(self.config.bank_dtype)
        changed_sum = total_sum = jnp.zeros((), jnp.float32)
        for key, (_, view, row_ids) in views.items():
            generic = key == bank_lib.GENERIC
            level = 0 if generic else int(key[1:])
            blocks = view.count.shape[0]
            if generic:
                assert use_generic is not None, "a generic block needs use_generic"
                active = jnp.any(use_generic)
            else:
                active = jnp.ones((), bool)
            # Rounding follows block ids, not view rows: a host tier's view holds the step's
            # blocks at other positions than the device bank does.
            values = (lr, scale, active, step, row_ids)

            def rule(
                rows: bank_lib.LevelBank,
                grads: dict,
                union: Array,
                places: dict,
                values: tuple,
                level: int = level,
                blocks: int = blocks,
            ) -> tuple:
                lr, scale, active, step, row_ids = values
                valid = (union < blocks) & active
                block_ids = union if row_ids is None else jnp.take(row_ids, union, mode="clip")
                keys = row_rounding_keys(self.seed + 104729, step, level, block_ids)
                counters = {
                    name: element_counters(rows.params[name].shape[1:], whole, axis, at)
                    for name, (axis, at, whole) in places.items()
                }
                scaled = {n: (g * scale).astype(g.dtype) for n, g in grads.items()}
                params, mu, nu, count = sparse_adamw(
                    rows.params,
                    scaled,
                    rows.mu,
                    rows.nu,
                    rows.count,
                    valid,
                    lr,
                    self.config,
                    keys,
                    counters,
                )
                new = bank_lib.LevelBank(params=params, mu=mu, nu=nu, count=count)
                zero = jnp.zeros((), jnp.float32)
                split, whole = [zero, zero, zero], [zero, zero, jnp.sum(valid).astype(zero.dtype)]
                for name, before in rows.params.items() if narrow else ():
                    moved = (params[name] != before).reshape(before.shape[0], -1)
                    into = whole if places[name][2] == before.shape[1:] else split
                    into[0] += jnp.sum(jnp.where(valid, moved.sum(axis=1), 0))
                    into[1] += jnp.sum(valid) * before[0].size
                return new, (tuple(split), tuple(whole))

            new_views[key], (changed, total, unique) = exchange.update(
                view, reduced[key], rule, values
            )
            if not generic:
                metrics[f"mem/unique_blocks_l{level}"] = unique
            changed_sum, total_sum = changed_sum + changed, total_sum + total
        if narrow:
            metrics["mem/changed_fraction"] = changed_sum / jnp.maximum(total_sum, 1.0)
        return new_views, metrics

    @staticmethod
    def fetch_metrics(views: Mapping[str, View]) -> dict[str, Array]:
        """`mem/fetch_bytes`: the bytes of blocks one batch shard fetched (mean over shards)."""
        fetch_bytes = jnp.zeros((), jnp.float32)
        for key, (ids, view, _) in views.items():
            if key == bank_lib.GENERIC:
                continue
            row_bytes = sum(x[0].size * x.dtype.itemsize for x in view.params.values())
            fetched = jnp.sum(ids < view.count.shape[0]) / ids.shape[0]
            fetch_bytes = fetch_bytes + fetched * row_bytes
        return {"mem/fetch_bytes": fetch_bytes}
