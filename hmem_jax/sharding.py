"""The device mesh and the mapping from logical axis names to it.

The model names the axes of every parameter and key activation ('embed',
'mlp', 'heads', 'batch', ...). `MeshConfig.rules` maps those names to mesh
axes ('data', 'fsdp', 'tensor', 'memory'); this module turns the two into
`NamedSharding`s. Changing the parallelism of a run is a config change only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hmem_jax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor", "memory")


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, ...]:
    """Resolve the -1 axis (if any) so the mesh covers exactly `num_devices`."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor, cfg.memory]
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(
                f"MeshConfig {dict(zip(MESH_AXES, sizes))}: the fixed axes multiply to {known}, "
                f"which does not divide the {num_devices} devices; change the fixed axis sizes."
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"MeshConfig {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
            f"{num_devices} are present; set one axis to -1 or match the device count."
        )
    return tuple(sizes)


def build_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor, memory) over all (or the given) devices.

    Axes are `Auto`: the compiler propagates shardings from the constraints we
    place (the classic pjit model), rather than sharding-in-types.
    """
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(cfg, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


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
