"""The platform a computation is traced for, and what 'auto' settings mean on it.

An ahead-of-time compile for a TPU topology (`hmem compile --topology`) traces on a CPU host
under an abstract TPU mesh, so the platform is read from the current mesh first and from the
default backend only without one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ACCELERATORS = ("gpu", "tpu")


def traced_platform() -> str:
    """'cpu', 'gpu' or 'tpu': the current mesh's devices', else the default backend's."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.abstract_device is not None:
        return str(mesh.abstract_device.platform)
    return jax.default_backend()


def compute_dtype(name: str) -> jnp.dtype:
    """A compute dtype by name; 'auto' is bfloat16 on GPU and TPU (their matmul units' fast
    type; parameters and optimizer state stay in `param_dtype`) and float32 on CPU (where
    bfloat16 matmuls are slower, and the tests' reference numerics are float32)."""
    if name == "auto":
        return jnp.dtype(jnp.bfloat16 if traced_platform() in ACCELERATORS else jnp.float32)
    return jnp.dtype(name)
