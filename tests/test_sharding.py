"""Meshes from MeshConfig: within one slice as before, and across slices (`dcn_*`), on the 8 fake
CPU devices of the test set-up grouped into simulated slices (CPU devices carry no slice_index,
so the slices are given as explicit ids, one per device)."""

import jax
import numpy as np
import pytest

from hmem_jax import sharding
from hmem_jax.config import MeshConfig, Role, settings_of
from hmem_jax.errors import ConfigError


def _ids(mesh):
    return np.vectorize(lambda d: d.id)(mesh.devices)


def _plain_mesh(cfg, devices):
    """The mesh build_mesh made before it knew slices: jax.make_mesh over the devices."""
    shape = sharding.mesh_shape(cfg, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * 4
    return jax.make_mesh(shape, sharding.MESH_AXES, axis_types=auto, devices=devices)


def test_two_slices_of_four_fill_one_half_of_the_data_axis_each():
    devices = jax.devices()[:8]
    slice_of = {d.id: i // 4 for i, d in enumerate(devices)}
    mesh = sharding.build_mesh(MeshConfig(dcn_data=2), devices, [slice_of[d.id] for d in devices])
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1, "memory": 1}
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 4
    for half in range(2):
        assert {slice_of[i] for i in _ids(mesh)[half].flat} == {half}
    # Consecutive slices along data are exactly the single-slice mesh of data = 2.
    np.testing.assert_array_equal(
        _ids(mesh), _ids(sharding.build_mesh(MeshConfig(data=2), devices))
    )


def test_slices_are_grouped_by_their_ids_not_by_device_order():
    devices = jax.devices()[:8]
    interleaved = [i % 2 for i in range(8)]
    mesh = sharding.build_mesh(MeshConfig(dcn_data=2), devices, interleaved)
    np.testing.assert_array_equal(_ids(mesh)[0].ravel(), [d.id for d in devices[0::2]])
    np.testing.assert_array_equal(_ids(mesh)[1].ravel(), [d.id for d in devices[1::2]])


def test_across_slices_on_an_inner_axis_keeps_each_slice_contiguous():
    devices = jax.devices()[:8]
    slices = [i // 4 for i in range(8)]
    cfg = MeshConfig(data=2, fsdp=1, tensor=2, dcn_fsdp=2)
    mesh = sharding.build_mesh(cfg, devices, slices)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "memory": 1}
    slice_of = dict(zip((d.id for d in devices), slices))
    for position in range(2):  # the fsdp axis: its first half in slice 0, its second in slice 1
        assert {slice_of[i] for i in _ids(mesh)[:, position].flat} == {position}


@pytest.mark.parametrize(
    "cfg",
    [MeshConfig(), MeshConfig(data=2), MeshConfig(data=2, fsdp=-1, tensor=2), MeshConfig(memory=8)],
    ids=["default", "data2", "data2-tensor2", "memory8"],
)
def test_a_single_slice_config_gives_the_mesh_it_gave_before(cfg):
    devices = jax.devices()[:8]
    before = _plain_mesh(cfg, devices)
    for slice_ids in (None, [i // 4 for i in range(8)]):  # slices are ignored within one slice
        mesh = sharding.build_mesh(cfg, devices, slice_ids)
        assert mesh.axis_names == before.axis_names and mesh.shape == before.shape
        np.testing.assert_array_equal(_ids(mesh), _ids(before))


def test_sizes_multiply_within_and_across_slices():
    assert sharding.mesh_shape(MeshConfig(dcn_data=2), 8) == (2, 4, 1, 1)
    assert sharding.mesh_shape(MeshConfig(data=-1, fsdp=2, dcn_data=2), 8) == (4, 2, 1, 1)
    assert sharding.ici_shape(MeshConfig(data=-1, fsdp=2, dcn_data=2), 8) == (2, 2, 1, 1)
    assert sharding.batch_shards_for(MeshConfig(dcn_data=2), 8) == 8


def test_the_dcn_fields_change_how_a_step_is_computed_not_what_is_stored():
    roles = {s.gin_name: s.role for s in settings_of(MeshConfig(dcn_data=2))}
    for name in ("dcn_data", "dcn_fsdp", "dcn_tensor", "dcn_memory"):
        assert roles[f"MeshConfig.{name}"] is Role.COMPUTE


@pytest.mark.parametrize(
    "cfg, slice_ids, fragment",
    [
        # 8 devices of one process, no slice_index: one slice, not two.
        (MeshConfig(dcn_data=2), None, "form 1 slice(s) of 8 (grouped by process_index)"),
        (MeshConfig(dcn_data=3), [i // 4 for i in range(8)], "does not divide the 8 devices"),
        (MeshConfig(dcn_data=4), [i // 4 for i in range(8)], "needs 4 slices of 2 devices"),
        (MeshConfig(dcn_data=2), [0] * 6 + [1] * 2, "form 2 slice(s) of 2 or 6"),
        (
            MeshConfig(data=3, fsdp=1, dcn_data=2),
            [i // 4 for i in range(8)],
            "needs 3 devices per slice but each of the 2 slices",
        ),
        (MeshConfig(data=3, dcn_data=2), [i // 4 for i in range(8)], "does not divide the 4"),
    ],
    ids=["no-slices-found", "dcn-vs-devices", "dcn-vs-slices", "unequal-slices", "ici", "auto"],
)
def test_a_mesh_the_slices_cannot_form_is_one_clear_line(cfg, slice_ids, fragment):
    with pytest.raises(ConfigError, match="dcn_data") as raised:
        sharding.build_mesh(cfg, jax.devices()[:8], slice_ids)
    assert fragment in str(raised.value) and "\n" not in str(raised.value)


def test_dcn_sizes_must_be_positive():
    with pytest.raises(ConfigError, match=r"MeshConfig.dcn_tensor = 0 must be >= 1"):
        MeshConfig(dcn_tensor=0)
    with pytest.raises(ConfigError, match=r"MeshConfig.dcn_data = -1"):
        MeshConfig(dcn_data=-1)
