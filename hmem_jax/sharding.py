"""The device mesh and the mapping from logical axis names to it.

The model names the axes of every parameter and key activation ('embed',
'mlp', 'heads', 'batch', ...). `MeshConfig.rules` maps those names to mesh
axes ('data', 'fsdp', 'tensor', 'memory'); this module turns the two into
`NamedSharding`s. Changing the parallelism of a run is a config change only.

A mesh may span several slices (TPU slices joined by the data-centre network,
GPU nodes): `MeshConfig.dcn_*` say how each axis is split across them, and
`build_mesh` lays each slice's devices out as one contiguous block of the mesh
(`jax.experimental.mesh_utils.create_hybrid_device_mesh`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hmem_jax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor", "memory")


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
    """The mesh's axis sizes on `num_devices` devices: within-slice size x across-slice size
    per axis, the -1 axis (if any) resolved so the mesh covers exactly the devices."""
    ici = ici_shape(cfg, num_devices)
    return tuple(i * d for i, d in zip(ici, cfg.dcn_shape))


def ici_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
    """Each axis's size within one slice of `num_devices / prod(dcn_*)` devices."""
    slices = math.prod(cfg.dcn_shape)
    if num_devices % slices:
        raise ConfigError(
            f"MeshConfig {_dcn_sizes(cfg)} splits the mesh over {slices} slices, which does not "
            f"divide the {num_devices} devices; change the MeshConfig.dcn_* sizes."
        )
    per_slice = num_devices // slices
    if slices == 1:
        where, present = f"the {num_devices} devices", f"{num_devices} are present"
    else:
        where = f"the {per_slice} devices of each of the {slices} slices ({_dcn_sizes(cfg)})"
        present = f"each of the {slices} slices ({_dcn_sizes(cfg)}) has {per_slice}"
    sizes = [cfg.data, cfg.fsdp, cfg.tensor, cfg.memory]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if per_slice % known:
            raise ConfigError(
                f"MeshConfig {dict(zip(MESH_AXES, sizes))}: the fixed axes multiply to {known}, "
                f"which does not divide {where}; change the fixed axis sizes."
            )
        sizes[sizes.index(-1)] = per_slice // known
    if math.prod(sizes) != per_slice:
        raise ConfigError(
            f"MeshConfig {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices"
            f"{' per slice' if slices > 1 else ''} but {present}; set one axis to -1 or match "
            "the device count."
        )
    return tuple(sizes)


def _dcn_sizes(cfg: MeshConfig) -> dict[str, int]:
    return dict(zip(cfg.dcn_fields, cfg.dcn_shape))


def build_mesh(
    cfg: MeshConfig,
    devices: Sequence[Any] | None = None,
    slice_ids: Sequence[int] | None = None,
) -> Mesh:
    """A mesh with axes (data, fsdp, tensor, memory) over all (or the given) devices.

    Axes are `Auto`: the compiler propagates shardings from the constraints we
    place (the classic pjit model), rather than sharding-in-types.

    Across slices (any `MeshConfig.dcn_*` > 1) the devices are grouped into
    slices by `slice_ids` (one per device, in the order given), else by their
    `slice_index` (TPU slices), else by process (GPU nodes, CPU hosts): their
    number must be the product of the `dcn_*` sizes, each slice holding as many
    devices. Each slice is laid out within by `create_device_mesh` and the
    slices are stacked along the dcn axes.
    """
    devices = list(devices) if devices is not None else jax.devices()
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if math.prod(cfg.dcn_shape) == 1:
        shape = mesh_shape(cfg, len(devices))
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    ici = ici_shape(cfg, len(devices))
    grouped, by = _slices(devices, slice_ids)
    sizes = sorted({len(g) for g in grouped.values()})
    if len(grouped) != math.prod(cfg.dcn_shape) or sizes != [math.prod(ici)]:
        raise ConfigError(
            f"MeshConfig {_dcn_sizes(cfg)} needs {math.prod(cfg.dcn_shape)} slices of "
            f"{math.prod(ici)} devices, but the {len(devices)} devices form {len(grouped)} "
            f"slice(s) of {' or '.join(map(str, sizes))} (grouped by {by}); set the "
            "MeshConfig.dcn_* sizes to multiply to the number of slices."
        )
    if slice_ids is None:
        granule = by == "process_index"
        array = mesh_utils.create_hybrid_device_mesh(
            ici, cfg.dcn_shape, devices, process_is_granule=granule
        )
    else:
        marked = [_InSlice(d, int(s)) for d, s in zip(devices, slice_ids)]
        array = mesh_utils.create_hybrid_device_mesh(ici, cfg.dcn_shape, marked)
        array = np.vectorize(lambda m: m.device, otypes=[object])(array)
    return Mesh(array, MESH_AXES, axis_types=auto)


def _slices(
    devices: Sequence[Any], slice_ids: Sequence[int] | None
) -> tuple[dict[int, list[Any]], str]:
    """slice -> its devices, and what grouped them."""
    if slice_ids is not None:
        if len(slice_ids) != len(devices):
            raise ValueError(f"{len(slice_ids)} slice ids for {len(devices)} devices.")
        keys, by = [int(s) for s in slice_ids], "the slice ids given"
    elif all(hasattr(d, "slice_index") for d in devices):
        keys, by = [d.slice_index for d in devices], "slice_index"
    else:
        keys, by = [d.process_index for d in devices], "process_index"
    grouped: dict[int, list[Any]] = {}
    for key, device in zip(keys, devices):
        grouped.setdefault(key, []).append(device)
    return grouped, by


@dataclasses.dataclass(frozen=True, eq=False)
class _InSlice:
    """A device with an explicit slice, for `create_hybrid_device_mesh` (which reads
    `slice_index`): devices that carry none (CPU) grouped as asked. Every other attribute is
    the device's own, so the layout within a slice is the device's."""

    device: Any
    slice_index: int

    def __getattr__(self, name: str) -> Any:
        return getattr(self.device, name)


def rules_of(cfg: MeshConfig) -> tuple[tuple[str, Any], ...]:
    return tuple(
        (name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in cfg.rules
    )


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Iterator[None]:
    """Make `mesh` and the logical rules current, so activation constraints apply while tracing."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def logical_to_sharding(logical_specs: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """Map a tree of logical PartitionSpecs to NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]], ndim: int) -> NamedSharding:
    """Leading axis over the 'batch' rule's mesh axes, the rest replicated."""
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
    assert spec is not None
    return NamedSharding(mesh, spec)


def mesh_axes(rules: Sequence[tuple[str, Any]], logical: str) -> tuple[str, ...]:
    """The mesh axes the rules map the logical axis `logical` to (none if unmapped)."""
    axes = dict(rules).get(logical)
    return (axes,) if isinstance(axes, str) else tuple(axes or ())


def axis_size(
    mesh: Mesh | Mapping[str, int], rules: Sequence[tuple[str, Any]], logical: str
) -> int:
    """How many ways the logical axis `logical` is split on `mesh` (or on a mesh of that shape:
    mesh axis name -> size, for meshes larger than the devices present)."""
    shape = mesh.shape if isinstance(mesh, Mesh) else mesh
    return math.prod(shape[a] for a in mesh_axes(rules, logical))


def batch_shards(mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> int:
    """How many ways the batch axis is split (the global batch must divide by it)."""
    return axis_size(mesh, rules, "batch")


def batch_shards_for(cfg: MeshConfig, num_devices: int) -> int:
    """How many ways the batch is split on the mesh `cfg` makes of `num_devices` devices."""
    shape = dict(zip(MESH_AXES, mesh_shape(cfg, num_devices)))
    return axis_size(shape, rules_of(cfg), "batch")


def global_batch(
    local: Mapping[str, np.ndarray], mesh: Mesh, rules: Sequence[tuple[str, Any]]
) -> dict:
    """Assemble this process's rows into global arrays sharded over the 'batch' axes.

    Each process passes only its slice (rows [p·B/P, (p+1)·B/P)).
    """
    out = {}
    for name, value in local.items():
        value = np.asarray(value)
        sharding = batch_sharding(mesh, rules, value.ndim)
        global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
        out[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out
