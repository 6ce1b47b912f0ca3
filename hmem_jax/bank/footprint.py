"""What the memory costs each device: the resident bank share and what one step brings in.

Arithmetic on shapes only (no allocation), for any mesh size, so `hmem info --devices=256` can
say what a pod would hold before a pod is rented. It follows the layout the code uses:

- device tier: the bank's leaves (params, both moments, the per-block counts) are laid out by
  `bank.device.bank_logical_axes`, the function that lays out the train state; a leaf split
  over 'memory_blocks' is held 1/N per device, any other leaf whole. A streamed bank holds
  nothing on devices;
- each step gathers the unique blocks of the *global* batch, `min(global batch, clusters)` rows
  per level (the loader's static capacity) plus the generic block, and every device receives all
  of them with their moments (replicated rows, `bank.device.fetch` / the streamed rows).

`tests/test_bank_footprint.py` checks these figures against the compiled step's argument sizes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from hmem_jax import sharding
from hmem_jax.bank.device import bank_logical_axes, init_bank
from hmem_jax.bank.geometry import BankGeometry
from hmem_jax.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class MemoryFootprint:
    devices: int
    batch_shards: int
    per_device_batch: int
    global_batch: int
    bank_bytes: int  # the whole bank: params, moments, counts
    bank_bytes_per_device: int  # resident on one device (0 for a streamed bank)
    memory_step_bytes: int  # the rows one step fetches, with their moments
    memory_step_bytes_per_device: int  # what of them one device receives

    def describe(self) -> dict:
        return dataclasses.asdict(self)


def memory_footprint(cfg: TrainConfig, devices: int,
                     per_device_batch: int | None = None) -> MemoryFootprint:
    """The footprint of `cfg`'s memory on a mesh of `devices` (`MeshConfig` resolved for it).

    `per_device_batch`: sequences per batch shard; default `TrainConfig.batch_size` divided
    over the batch shards.
    """
    memory = cfg.memory
    geometry = BankGeometry.from_configs(cfg.model, memory, cfg.hierarchy)
    shape = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(cfg.mesh, devices)))
    rules = sharding.rules_of(cfg.mesh)
    shards = sharding.axis_size(shape, rules, "batch")
    if per_device_batch is None:
        per_device_batch = max(1, cfg.batch_size // shards)
    batch = per_device_batch * shards
    row_shards = sharding.axis_size(shape, rules, "memory_blocks")
    bank = jax.eval_shape(lambda: init_bank(
        geometry, 0, jnp.dtype(memory.bank_dtype), jnp.dtype(memory.moment_dtype),
        memory.generic_probability > 0))
    specs = bank_logical_axes(bank, row_shards, geometry.rank_axes)
    total = resident = fetched = 0
    for key, level in bank.items():
        leaves = jax.tree.leaves(level)
        level_bytes = sum(x.size * x.dtype.itemsize for x in leaves)
        total += level_bytes
        resident += sum(x.size * x.dtype.itemsize // (row_shards if "memory_blocks" in spec else 1)
                        for x, spec in zip(leaves, jax.tree.leaves(specs[key])))
        rows = level.count.shape[0]
        fetched += level_bytes // rows * min(batch, rows)
    if memory.bank_tier == "streaming":
        resident = 0
    return MemoryFootprint(devices=devices, batch_shards=shards,
                           per_device_batch=per_device_batch, global_batch=batch,
                           bank_bytes=total, bank_bytes_per_device=resident,
                           memory_step_bytes=fetched, memory_step_bytes_per_device=fetched)
