"""Moving a step's memory blocks between the bank's slices and the batch shards.

Layout. A bank view (the device tier's whole bank, or the rows a host tier
hands a step) splits every block along one of its axes over the bank's mesh
axes (the 'memory_blocks' rule: every device but the 'tensor' axis), so each
of the P devices holds 1/P of every block and of its moments; the per-block
update counts are small and kept whole. A view whose blocks have no axis
that divides by P is held whole on every device (`slice_axis` is None).

A step. Batch shard s (one position of the 'batch' axes) names the C blocks
its own sequences use, `ids[s]` (static capacity, padded with the level's
block count). Then, inside `shard_map`:
- `fetch`: every device gathers its slice of every shard's blocks (P·C slices
  of 1/P of a block: C blocks' worth) and one `all_to_all` hands each shard
  its C whole blocks. Only parameters travel; moments stay where they live.
- `reduce`: the per-shard gradients of those blocks travel back the same way
  (the transpose of the fetch's `all_to_all`), and each device sums, over the
  union of all shards' ids, the slices of a block several shards used: a block
  gets one update with the exact sum of its gradients.
- `update`: sparse AdamW on the slices of the union's blocks, where the
  moments are, written back into the view; blocks not in the union are not
  touched.

Per device and step that is C blocks of parameters in and C blocks of
gradients out whatever P is, so memory traffic and scratch space scale with
the per-device batch, not with the global batch or the mesh. Devices of one
batch shard along a mesh axis outside 'batch' (e.g. 'memory') fetch the same
blocks; only the first of them sends gradients, so each sequence counts once.
Whole (unsliced) views gather every shard's gradients on every device
instead: exact, but P·C blocks per device.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from hmem_jax.bank import device as bank_lib
from hmem_jax.sharding import mesh_axes

Array = jax.Array
Params = Mapping[str, Array]


def slice_mesh_axes(rules: Any, axis_names: tuple[str, ...]) -> tuple[str, ...]:
    """The mesh axes a view is split over: the 'batch' axes and the 'memory_blocks' axes, in
    mesh order (each batch shard must reach every slice, so the batch axes are always in)."""
    wanted = set(mesh_axes(rules, "batch")) | set(mesh_axes(rules, "memory_blocks"))
    return tuple(a for a in axis_names if a in wanted)


def slice_axis(shape: tuple[int, ...], slices: int) -> int | None:
    """The axis (not the leading block axis) along which a view of `shape` is split `slices`
    ways: the longest that divides, the later of equal ones; None if none does."""
    if slices == 1:
        return None
    fits = [(size, axis) for axis, size in enumerate(shape) if axis > 0 and size % slices == 0]
    return max(fits)[1] if fits else None


@flax.struct.dataclass
class Reduced:
    """A level's summed gradients: `union` int32[U] (the step's distinct ids, padded with the
    level's block count), `grads[name]` [U, ...] laid out like the view, and the sum of their
    squares (for the global-norm clip)."""

    union: Array
    grads: dict[str, Array]
    square_sum: Array


@dataclasses.dataclass(frozen=True)
class BlockExchange:
    """The collectives of per-shard blocks on one mesh (see module doc)."""

    mesh: Mesh
    batch_axes: tuple[str, ...]
    slice_axes: tuple[str, ...]

    @classmethod
    def for_mesh(cls, mesh: Mesh, rules: Any) -> BlockExchange:
        return cls(mesh, mesh_axes(rules, "batch"), slice_mesh_axes(rules, mesh.axis_names))

    @property
    def slices(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.slice_axes)

    @property
    def shards(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.batch_axes)

    # ----- layout -------------------------------------------------------------------------

    def axis(self, shape: tuple[int, ...]) -> int | None:
        return slice_axis(shape, self.slices)

    def spec(self, shape: tuple[int, ...]) -> PartitionSpec:
        """Where a view leaf of `shape` lives: split along `axis(shape)`, else whole."""
        axis = self.axis(shape)
        if axis is None:
            return PartitionSpec()
        return PartitionSpec(*([None] * axis), self.slice_axes)

    def _axes(self, params: Params) -> dict[str, int | None]:
        return {name: self.axis(tuple(x.shape)) for name, x in params.items()}

    def _specs(self, params: Params) -> dict[str, PartitionSpec]:
        return {name: self.spec(tuple(x.shape)) for name, x in params.items()}

    def _map(self, body: Callable, in_specs: tuple, out_specs: Any) -> Callable:
        return jax.shard_map(
            body, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
        )

    def _all_ids(self, ids: Array) -> Array:
        """Inside the map: every device's ids [C] -> [P, C], in slice order."""
        return jax.lax.all_gather(ids, self.slice_axes)

    def _first_of_shard(self) -> Array:
        """Inside the map: 1.0 on the first device of each batch shard, 0.0 on its copies."""
        extra = [a for a in self.slice_axes if a not in self.batch_axes]
        if not extra:
            return jnp.ones((), jnp.float32)
        index = jax.lax.axis_index(tuple(extra))
        return (index == 0).astype(jnp.float32)

    # ----- the three steps ----------------------------------------------------------------

    def fetch(self, view: Params, ids: Array) -> dict[str, Array]:
        """view[name] [N, ...] and ids int32[S, C] -> each shard's blocks [S, C, ...] (batch-
        sharded; padding ids fetch a real block no sequence points at)."""
        axes = self._axes(view)
        slices, batch = self.slices, PartitionSpec(self.batch_axes)

        def body(local: Params, shard_ids: Array) -> dict[str, Array]:
            mine = shard_ids[0]
            every = self._all_ids(mine).reshape(-1)
            out = {}
            for name, x in local.items():
                axis = axes[name]
                if axis is None:
                    out[name] = jnp.take(x, mine, axis=0, mode="clip")[None]
                    continue
                pieces = jnp.take(x, every, axis=0, mode="clip")
                pieces = pieces.reshape((slices, mine.shape[0]) + pieces.shape[1:])
                got = jax.lax.all_to_all(pieces, self.slice_axes, 0, 0, tiled=True)
                got = jnp.moveaxis(got, 0, axis)  # [C, ..., P, size/P, ...]
                full = list(x.shape)
                full[axis] *= slices
                out[name] = got.reshape((1, mine.shape[0]) + tuple(full[1:]))
            return out

        return self._map(body, (self._specs(view), batch), batch)(dict(view), ids)

    def reduce(self, grads: Params, ids: Array, blocks: int, view: Params) -> Reduced:
        """Per-shard gradients [S, C, ...] of the fetched blocks -> summed per distinct block,
        laid out like `view` (the level's view, for its layout); `blocks` = the level's count."""
        axes = self._axes(view)
        slices, batch = self.slices, PartitionSpec(self.batch_axes)
        union_size = slices * ids.shape[1]

        def body(shard_grads: Params, shard_ids: Array) -> tuple:
            every = self._all_ids(shard_ids[0]).reshape(-1)
            union, inverse = jnp.unique(
                every, size=union_size, fill_value=blocks, return_inverse=True
            )
            inverse = inverse.reshape(-1)
            keep = self._first_of_shard()
            summed, split_sq, whole_sq = {}, jnp.zeros(()), jnp.zeros(())
            for name, g in shard_grads.items():
                g = g[0] * keep.astype(g.dtype)  # [C, ...]
                axis = axes[name]
                if axis is None:
                    every_g = jax.lax.all_gather(g, self.slice_axes, tiled=True)
                    summed[name] = jax.ops.segment_sum(every_g, inverse, union_size)
                    whole_sq = whole_sq + jnp.sum(jnp.square(summed[name].astype(jnp.float32)))
                    continue
                parts = g.reshape(
                    g.shape[:axis] + (slices, g.shape[axis] // slices) + g.shape[axis + 1 :]
                )
                parts = jax.lax.all_to_all(
                    jnp.moveaxis(parts, axis, 0), self.slice_axes, 0, 0, tiled=True
                )  # [P, C, ..., size/P, ...]
                parts = parts.reshape((union_size,) + parts.shape[2:])
                summed[name] = jax.ops.segment_sum(parts, inverse, union_size)
                split_sq = split_sq + jnp.sum(jnp.square(summed[name].astype(jnp.float32)))
            square_sum = whole_sq + jax.lax.psum(split_sq, self.slice_axes)
            return union, summed, square_sum

        union, summed, square_sum = self._map(
            body, (batch, batch), (PartitionSpec(), self._specs(view), PartitionSpec())
        )(dict(grads), ids)
        return Reduced(union=union, grads=summed, square_sum=square_sum)

    def update(self, view: Any, reduced: Reduced, rule: Callable, scalars: Any) -> tuple:
        """Apply `rule` to the union's rows of `view` and write them back.

        view: a LevelBank-like pytree (params and moments [N, ...] laid out by `spec`, count
        int32[N] whole). rule(rows, grads, union, places, scalars) -> (new rows, extras) runs
        on each device's slices; places[name] = (axis, offset, whole row shape) says where the
        slice sits in a whole block row (axis and offset 0 for whole leaves), so per-element
        randomness can follow the element's place in the block, not the layout. extras is
        (split, whole): pytrees of numbers from split leaves (summed over the slices) and from
        whole leaves (the same on every device). Returns (new view, split + whole extras).
        """
        params = view.params
        axes = self._axes(params)
        slices = self.slices

        def body(local: Any, union: Array, grads: Params, values: Any) -> tuple:
            index = jax.lax.axis_index(self.slice_axes)
            places = {}
            for name, x in local.params.items():
                row = list(x.shape[1:])
                block_axis = axes[name]
                if block_axis is None:
                    places[name] = (0, 0, tuple(row))
                    continue
                axis = block_axis - 1
                offset = index * row[axis]
                row[axis] *= slices
                places[name] = (axis, offset, tuple(row))
            new_rows, (split, whole) = rule(
                bank_lib.fetch(local, union), grads, union, places, values
            )
            new_view = bank_lib.commit(local, union, new_rows)
            extras = jax.tree.map(lambda s, w: jax.lax.psum(s, self.slice_axes) + w, split, whole)
            return new_view, extras

        view_specs = jax.tree.map(lambda x: self.spec(tuple(x.shape)), view)
        mapped = self._map(
            body,
            (view_specs, PartitionSpec(), self._specs(params), PartitionSpec()),
            (view_specs, PartitionSpec()),
        )
        return mapped(view, reduced.union, reduced.grads, scalars)
