"""Lazy materialisation: the value of a block that was never written, computed on the host.

A streamed bank stores only blocks that training has updated; every other
block *is* its initialisation, which `hmem_jax.bank.device.init_block` defines
from (seed, level, block id) alone. Computing it here with the same function
(on the CPU backend, vmapped over the requested ids) gives bit-for-bit the
values of an eagerly initialised device bank, so a 21B-parameter bank costs
disk only for touched blocks and the two tiers train identically.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from hmem_jax.bank import device as bank_lib
from hmem_jax.bank.geometry import BankGeometry
from hmem_jax.bank.layout import COUNT, LevelLayout


class Materializer:
    """Initial rows (params from init_block, zero moments, count 0) for any ids of any level."""

    def __init__(self, geometry: BankGeometry, seed: int) -> None:
        self.geometry = geometry
        self.seed = seed
        self._fns: dict[str, Callable] = {}
        self._lock = threading.Lock()
        self._cpu = jax.local_devices(backend="cpu")[0]  # this process's own CPU

    def _fn(self, layout: LevelLayout) -> Callable:
        with self._lock:
            if layout.key not in self._fns:
                dtype = next(d for f, (_, d) in layout.fields.items() if f.startswith("params/"))
                geometry, rank, seed, level = self.geometry, layout.rank, self.seed, layout.level
                self._fns[layout.key] = jax.jit(
                    jax.vmap(
                        lambda i: bank_lib.init_block(
                            geometry, rank, seed, level, i, jnp.dtype(dtype)
                        )
                    )
                )
            return self._fns[layout.key]

    def rows(self, layout: LevelLayout, ids: np.ndarray) -> dict[str, np.ndarray]:
        """field -> [len(ids), ...]: the initial value of blocks `ids` of this level."""
        out = layout.empty_rows(len(ids))
        if len(ids) == 0:
            return out
        # Pad to a power of two so a run compiles a handful of shapes, not one per count.
        padded = np.zeros(1 << (len(ids) - 1).bit_length(), np.int32)
        padded[: len(ids)] = ids
        with jax.default_device(self._cpu):
            params = jax.device_get(self._fn(layout)(jnp.asarray(padded)))
        for name, value in params.items():
            out[f"params/{name}"][...] = np.asarray(value)[: len(ids)]
        out[COUNT][...] = 0
        return out
