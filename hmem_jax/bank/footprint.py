"""What the memory costs each device: the resident bank share and what one step brings in.

Arithmetic only (no allocation), for any mesh size, so `hmem info --devices=256` can say what a
pod would hold before a pod is rented. It follows the layout the code uses today:

- device tier: every level's rows (params, both moments, the per-block count) are split over
  the mesh axes of the 'memory_blocks' rule (by default all but 'tensor') when the row count
  divides by them, else its matrices along the rank axis when the rank does (counts then
  replicated), else the level is replicated (`bank.device.bank_logical_axes`); a streamed bank
  holds nothing on devices;
- each step gathers the unique blocks of the *global* batch, `min(global batch, clusters)` rows
  per level (the loader's static capacity) plus the generic block, and every device receives all
  of them with their moments (replicated rows, `bank.device.fetch` / the streamed rows).

`tests/test_bank_footprint.py` checks these figures against the compiled step's argument sizes.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from hmem_jax import sharding
from hmem_jax.bank.device import GENERIC
from hmem_jax.bank.geometry import BankGeometry
from hmem_jax.config import TrainConfig

_COUNT_BYTES = 4  # int32 update count per block


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


def row_bytes(geometry: BankGeometry, level: int | str, bank_dtype: str,
              moment_dtype: str) -> int:
    """Bytes of one block of `level` with its two moments and its count."""
    rank = geometry.fetched_rank if level == GENERIC else geometry.level_sizes[int(level) - 1]
    params = sum(math.prod(spec.at_rank(rank)) for spec in geometry.matrices.values())
    params *= len(geometry.layers)
    return (params * np.dtype(bank_dtype).itemsize
            + 2 * params * np.dtype(moment_dtype).itemsize + _COUNT_BYTES)


def memory_footprint(cfg: TrainConfig, devices: int,
                     per_device_batch: int | None = None) -> MemoryFootprint:
    """The footprint of `cfg`'s memory on a mesh of `devices` (`MeshConfig` resolved for it).

    `per_device_batch`: sequences per batch shard; default `TrainConfig.batch_size` divided
    over the batch shards.
    """
    memory = cfg.memory
    geometry = BankGeometry.from_configs(cfg.model, memory, cfg.hierarchy)
    axes = dict(zip(sharding.MESH_AXES, sharding.mesh_shape(cfg.mesh, devices)))
    rules = dict(sharding.rules_of(cfg.mesh))

    def split(logical: str) -> int:
        names = rules.get(logical)
        names = (names,) if isinstance(names, str) else tuple(names or ())
        return math.prod(axes[name] for name in names)

    shards = split("batch")
    if per_device_batch is None:
        per_device_batch = max(1, cfg.batch_size // shards)
    batch = per_device_batch * shards
    row_shards = split("memory_blocks")
    levels: list[tuple[int | str, int, int]] = [
        (level, geometry.clusters(level), geometry.level_sizes[level - 1])
        for level in geometry.active_levels]
    if memory.generic_probability > 0:
        levels.append((GENERIC, 1, geometry.fetched_rank))
    bank = resident = fetched = 0
    for level, clusters, rank in levels:
        size = row_bytes(geometry, level, memory.bank_dtype, memory.moment_dtype)
        bank += clusters * size
        if clusters % row_shards == 0:
            resident += clusters * size // row_shards
        elif rank % row_shards == 0:  # split along the rank axis; counts replicated
            resident += clusters * (size - _COUNT_BYTES) // row_shards + clusters * _COUNT_BYTES
        else:
            resident += clusters * size
        fetched += min(batch, clusters) * size
    if memory.bank_tier == "streaming":
        resident = 0
    return MemoryFootprint(devices=devices, batch_shards=shards,
                           per_device_batch=per_device_batch, global_batch=batch,
                           bank_bytes=bank, bank_bytes_per_device=resident,
                           memory_step_bytes=fetched, memory_step_bytes_per_device=fetched)
