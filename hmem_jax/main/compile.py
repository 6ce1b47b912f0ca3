"""Compile the real train step ahead of time, for a mesh that need not be here:

    python -m hmem_jax.main.compile --gin_file=experiments/default.gin --devices=8
    python -m hmem_jax.main.compile --gin_file=experiments/paper_160m.gin --devices=64 \\
        --gin_param="MeshConfig.dcn_data = 2" --device_memory_gib=16
    python -m hmem_jax.main.compile --gin_file=experiments/paper_1p4b.gin --topology=v5e:4x4

Why: a mesh the devices cannot form, a batch that does not divide over it, or a step that
does not fit a device's memory shows up here in a minute, before any corpus is prepared or
job is queued (MaxText's `train_compile`). It lowers and compiles the step the training loop
runs (`hmem_jax.train.aot`: real state shapes, memory plan and batch keys, no data, checkpoint
or tree) and prints the mesh, XLA's per-device memory (`compiled.memory_analysis()`), XLA's
FLOPs beside the analytic count, and, with `--device_memory_gib`, whether the step fits
(exit status 1 when it does not).

Devices:
- `--devices=N`: N fake CPU devices (`jax_num_cpu_devices`, set before JAX starts a backend,
  whatever XLA_FLAGS say). The mesh, shardings and collectives are the real ones, but the
  figures are XLA:CPU's (its layouts and fusions); they estimate, not measure, a GPU or TPU.
- `--topology=v5e:2x2` (a TPU generation and chip grid, as `jax.experimental.topologies.
  get_topology_desc` names it): compile-only TPU devices from libtpu's compiler, which runs on
  any x86 Linux host without a TPU, so the figures are the TPU compiler's. Needs libtpu
  (`pip install "jax[tpu]"`); without it this is a one-line error. This path has never run:
  there was no libtpu where it was written, so its arguments follow MaxText's `train_compile`
  and jax's source, untested.
- neither: the devices present.

A mesh across slices (`MeshConfig.dcn_*` > 1) is compiled for as many slices as those sizes
multiply to: of the `--topology`; of the `--devices`, grouped into slices of consecutive
devices (CPU devices carry no slice of their own); of the devices present, as they are.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
from typing import Any

from absl import flags

from hmem_jax.errors import ConfigError, MissingExtraError
from hmem_jax.main import common

DEVICES = flags.DEFINE_integer("devices", None, "Compile for this many fake CPU devices.")
TOPOLOGY = flags.DEFINE_string(
    "topology", "", "Compile for a TPU topology, e.g. 'v5e:2x2' or 'v4:2x2x1' (needs libtpu)."
)
DEVICE_MEMORY_GIB = flags.DEFINE_float(
    "device_memory_gib", None, "Memory of one device; exit status 1 if the step needs more."
)

GIB = 1 << 30
MIB = 1 << 20


def check_flags() -> None:
    """Flag values that cannot describe any mesh: one line, before JAX starts."""
    if DEVICES.value is not None and DEVICES.value < 1:
        raise ConfigError(f"--devices = {DEVICES.value} must be a positive integer.")
    if DEVICES.value is not None and TOPOLOGY.value:
        raise ConfigError("--devices and --topology each say which devices; give one of them.")
    if DEVICE_MEMORY_GIB.value is not None and not DEVICE_MEMORY_GIB.value > 0:
        raise ConfigError(f"--device_memory_gib = {DEVICE_MEMORY_GIB.value} must be > 0.")


def fake_cpu_devices(count: int) -> list[Any]:
    """`count` CPU devices. Only possible before JAX has started a backend, which nothing in
    this process has done yet (the configuration is read without JAX)."""
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", count)
    return jax.devices()


def chips_per_host(topology: str) -> tuple[int, int, int]:
    """MaxText's chips-per-host bounds: a host drives at most 2 x 2 chips of the grid."""
    grid = [int(n) for n in topology.split(":")[1].split("x")]
    grid += [1] * (3 - len(grid))
    return (min(grid[0], 2), min(grid[1], 2), 1)


def topology_devices(topology: str, slices: int) -> list[Any]:
    """Compile-only devices of `slices` slices of a TPU topology (libtpu's compiler)."""
    if not re.fullmatch(r"v[0-9a-z]+:[0-9]+(x[0-9]+){1,2}", topology):
        raise ConfigError(
            f"--topology = {topology!r} is not a TPU topology such as 'v5e:2x2' or 'v4:2x2x1'."
        )
    if importlib.util.find_spec("libtpu") is None:
        raise MissingExtraError(
            f"--topology = {topology!r} compiles with libtpu's TPU compiler, which is not "
            'installed (pip install "jax[tpu]"); --devices=N compiles for N CPU devices instead.'
        )
    import jax
    from jax.experimental import topologies

    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no cloud metadata server to ask
    jax.config.update("jax_platforms", "cpu")  # compile-only devices: no TPU backend is started
    megacore = topology.startswith(("v4", "v5p"))
    try:
        described = topologies.get_topology_desc(
            topology_name=topology,
            platform="tpu",
            chip_config_name="megacore" if megacore else "default",
            chips_per_host_bounds=chips_per_host(topology),
            num_slices=slices,
        )
    except (RuntimeError, ValueError, NotImplementedError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"libtpu cannot describe --topology = {topology!r}: {first}") from None
    return list(described.devices)


def consecutive_slices(devices: int, slices: int) -> list[int]:
    """The slice of each of `devices` devices grouped into `slices` slices of consecutive ones."""
    if devices % slices:
        raise ConfigError(
            f"The MeshConfig.dcn_* sizes multiply to {slices} slices, which do not divide the "
            f"--devices = {devices} devices; change --devices or the dcn_* sizes."
        )
    return [i // (devices // slices) for i in range(devices)]


def _size(count: int) -> str:
    return f"{count / GIB:.2f} GiB" if abs(count) >= GIB else f"{count / MIB:.2f} MiB"


def report(step: Any, slices: int) -> list[str]:
    """The lines `main` prints for an `aot.CompiledStep`."""
    devices = step.mesh.devices.size
    platform = step.mesh.devices.flat[0].platform
    across = f", {slices} slices" if slices > 1 else ""
    memory = step.memory
    parts = [
        ("arguments", memory.arguments, ""),
        ("outputs", memory.outputs, ""),
        ("aliased", -memory.aliased, "  outputs in donated arguments' buffers, held once"),
        ("temporaries", memory.temporaries, ""),
        ("generated code", memory.generated_code, ""),
        ("total", memory.total, ""),
    ]
    lines = [
        f"mesh {dict(step.mesh.shape)} on {devices} {platform} devices{across}",
        "per-device memory (XLA memory_analysis):",
    ]
    lines += [f"  {name:<15}{_size(n):>12}  ({n} bytes){note}" for name, n, note in parts]
    analytic = step.analytic_flops / devices
    counted = step.counted_flops / devices
    lines += [
        "FLOPs per device and step:",
        f"  {'analytic':<22}{analytic:>10.4g}  (train_flops_per_token x {step.tokens:,} tokens "
        f"/ {devices} devices)",
    ]
    if step.xla_flops is None:
        lines.append("  XLA gives no FLOP count on this backend")
    else:
        lines += [
            f"  {'XLA cost_analysis':<22}{step.xla_flops:>10.4g}  (a loop's body counted once: "
            "one layer of the layer scan, one micro-batch)",
            f"  {'analytic as XLA counts':<22}{counted:>10.4g}  (XLA / this = "
            f"{step.xla_flops / counted:.3f})",
        ]
    return lines


def main(argv: list[str]) -> None:
    del argv
    check_flags()
    cfg = common.config_from_flags()
    from hmem_jax.train import aot

    slices = math.prod(cfg.mesh.dcn_shape)
    slice_ids = None
    if TOPOLOGY.value:
        devices = topology_devices(TOPOLOGY.value, slices)
    elif DEVICES.value is not None:
        devices = fake_cpu_devices(DEVICES.value)
        slice_ids = consecutive_slices(len(devices), slices)
    else:
        import jax

        devices = jax.devices()
    step = aot.compile_step(cfg, devices, slice_ids)
    print("\n".join(report(step, slices)), flush=True)
    budget = DEVICE_MEMORY_GIB.value
    if budget is None:
        return
    share = step.memory.total / (budget * GIB)
    if share > 1:
        print(
            f"error: the step needs {_size(step.memory.total)} per device, more than "
            f"--device_memory_gib = {budget:g} ({share:.0%} of it); shard it further "
            "(MeshConfig), lower the batch, or raise grad_accum_steps or remat.",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(1)
    print(f"fits: {_size(step.memory.total)} of {budget:g} GiB per device ({share:.1%})")


def run() -> None:
    """The command line entry point."""
    common.run(main, hint="use --gin_file, --gin_param and --devices")


if __name__ == "__main__":
    run()
