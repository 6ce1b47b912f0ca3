"""What the memory costs each device: the resident bank share and what one step brings in.

Arithmetic on shapes only (no allocation), for any mesh size, so `hmem info --devices=256` can
say what a pod would hold before a pod is rented. It follows the layout the code uses
(`bank.exchange`):

- device tier: each bank leaf (params, both moments) is split over the P devices of the
  'batch' and 'memory_blocks' axes along `exchange.slice_axis`, so a device holds 1/P of it;
  a leaf with no axis that divides by P, and the per-block counts, are held whole. A streamed
  bank holds nothing on devices between steps;
- per step, a device receives its batch shard's blocks: `min(per-shard batch, clusters)` rows
  per level (the loader's static capacity) plus the generic block, parameters only (moments
  stay with the slices), and sends as many gradients back. This does not depend on the
  number of devices. A streamed step's argument is instead the global batch's distinct blocks
  with their moments and counts, laid out like the device bank: each device gets 1/P of each
  (`bank/parts.py`), so per device that is (distinct blocks of the step) / P.

`tests/test_bank_footprint.py` checks these figures against the compiled step's argument sizes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from hmem_jax import sharding
from hmem_jax.bank.device import init_bank
from hmem_jax.bank.exchange import slice_axis, slice_mesh_axes
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
    memory_step_bytes: int  # the distinct blocks of one step's global batch (parameters)
    memory_step_bytes_per_device: int  # what one device receives for memory in one step

    def describe(self) -> dict:
        return dataclasses.asdict(self)


def memory_footprint(
    cfg: TrainConfig, devices: int, per_device_batch: int | None = None
) -> MemoryFootprint:
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
    slices = math.prod(shape[a] for a in slice_mesh_axes(rules, sharding.MESH_AXES))
    bank = jax.eval_shape(
        lambda: init_bank(
            geometry,
            0,
            jnp.dtype(memory.bank_dtype),
            jnp.dtype(memory.moment_dtype),
            memory.generic_probability > 0,
        )
    )
    streamed = memory.bank_tier == "streaming"
    total = resident = union_bytes = shard_bytes = streamed_rows = 0
    for level in bank.values():
        rows = level.count.shape[0]
        leaves = jax.tree.leaves(level)
        share = [1 if slice_axis(x.shape, slices) is None else slices for x in leaves]
        total += sum(_bytes(x) for x in leaves)
        resident += sum(_bytes(x) // n for x, n in zip(leaves, share))
        row_params = sum(_bytes(x) // rows for x in level.params.values())
        union = rows if rows == 1 else min(batch, rows)
        union_bytes += union * row_params
        shard_bytes += (rows if rows == 1 else min(per_device_batch, rows)) * row_params
        streamed_rows += union * sum(_bytes(x) // rows // n for x, n in zip(leaves, share))
    if streamed:
        resident, shard_bytes = 0, streamed_rows
    return MemoryFootprint(
        devices=devices,
        batch_shards=shards,
        per_device_batch=per_device_batch,
        global_batch=batch,
        bank_bytes=total,
        bank_bytes_per_device=resident,
        memory_step_bytes=union_bytes,
        memory_step_bytes_per_device=shard_bytes,
    )


def _bytes(x: jax.ShapeDtypeStruct) -> int:
    return x.size * x.dtype.itemsize
