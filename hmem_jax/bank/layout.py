"""What a streamed bank stores per block, and where (the kvstore spec): pure description.

A level's block is a set of fields, each an array of fixed shape and dtype:
`params/<matrix>` (bank dtype), `mu/<matrix>` and `nu/<matrix>` (moment dtype,
the sparse AdamW moments beside the block, docs/design.md decision 4) and `count`
(int32 scalar: updates the block has received). The generic block is a level
of its own with one block of rank R = Σ r_l, like in the device tier.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

from hmem_jax.bank import device as bank_lib
from hmem_jax.bank.geometry import BankGeometry
from hmem_jax.errors import ConfigError

COUNT = "count"


@dataclasses.dataclass(frozen=True)
class LevelLayout:
    """One level's blocks: how many, their rank and the shape/dtype of each field."""

    key: str  # 'l1', 'l2', ... or 'generic'
    level: int | str  # 1-based level, or 'generic'
    clusters: int
    rank: int
    fields: dict[str, tuple[tuple[int, ...], np.dtype]]  # field -> (block shape, dtype)

    @property
    def block_bytes(self) -> int:
        return sum(math.prod(shape) * dtype.itemsize for shape, dtype in self.fields.values())

    @property
    def param_bytes(self) -> int:
        return sum(
            math.prod(shape) * dtype.itemsize
            for name, (shape, dtype) in self.fields.items()
            if name.startswith("params/")
        )

    def empty_rows(self, n: int) -> dict[str, np.ndarray]:
        return {f: np.zeros((n,) + shape, dtype) for f, (shape, dtype) in self.fields.items()}


def level_layouts(
    geometry: BankGeometry, with_generic: bool, bank_dtype: str, moment_dtype: str
) -> dict[str, LevelLayout]:
    """level key -> layout for every level with memory (and the generic block)."""
    import jax.numpy as jnp  # jnp.dtype knows bfloat16

    p_dtype, m_dtype = np.dtype(jnp.dtype(bank_dtype)), np.dtype(jnp.dtype(moment_dtype))
    levels: list[tuple[int | str, int, int]] = [
        (l, geometry.clusters(l), geometry.level_sizes[l - 1]) for l in geometry.active_levels
    ]
    if with_generic:
        levels.append((bank_lib.GENERIC, 1, geometry.fetched_rank))
    out = {}
    for level, clusters, rank in levels:
        fields: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        for tree, dtype in (("params", p_dtype), ("mu", m_dtype), ("nu", m_dtype)):
            for name, spec in sorted(geometry.matrices.items()):
                fields[f"{tree}/{name}"] = ((len(geometry.layers),) + spec.at_rank(rank), dtype)
        fields[COUNT] = ((), np.dtype(np.int32))
        key = bank_lib.level_key(level)
        out[key] = LevelLayout(key, level, clusters, rank, fields)
    return out


def kvstore_spec(location: str, workdir: str) -> dict[str, Any]:
    """A tensorstore kvstore JSON spec (a directory, path ending in '/') for `bank_store`.

    '' -> WORKDIR/bank (on the workdir's disk or object store); a JSON object -> itself; a URL
    ('file:///...', 'gs://...', 's3://...', 'memory://...') -> tensorstore's
    parse of it; anything else -> a local path.
    """
    import tensorstore as ts

    if not location:
        from hmem_jax import paths

        default = paths.join(workdir, "bank")
        if paths.is_remote(default):  # an object-store workdir keeps its bank beside it
            spec: dict[str, Any] = ts.KvStore.Spec(default + "/").to_json()
        else:
            spec = {"driver": "file", "path": default}
    elif location.lstrip().startswith("{"):
        try:
            spec = json.loads(location)
        except json.JSONDecodeError as err:
            raise ConfigError(
                f"MemoryConfig.bank_store looks like a JSON kvstore spec but does not "
                f"parse ({err}): {location!r}."
            ) from err
    elif "://" in location:
        try:
            spec = ts.KvStore.Spec(location).to_json()
        except ValueError as err:  # tensorstore's word for a URL it cannot parse
            raise ConfigError(
                f"MemoryConfig.bank_store = {location!r} is not a kvstore URL tensorstore "
                f"reads ({err}); give a local path, a URL such as gs://bucket/bank/ or "
                "file:///abs/path/, or a JSON kvstore spec."
            ) from err
    else:
        spec = {"driver": "file", "path": os.path.abspath(location)}
    from hmem_jax.paths import with_environment

    spec = with_environment(spec)  # s3: AWS_ENDPOINT_URL and region; s3/gcs: short retries
    if spec.get("driver") == "file":
        spec["path"] = os.path.abspath(spec["path"])
    path = spec.get("path", "")
    if path and not path.endswith("/"):
        spec["path"] = path + "/"
    return spec


def describe_location(spec: dict[str, Any]) -> str:
    """A short human-readable name of a kvstore spec, for error messages."""
    driver = spec.get("driver", "?")
    where = spec.get("bucket", "")
    return f"{driver}://{where}{'/' if where else ''}{spec.get('path', '')}"
