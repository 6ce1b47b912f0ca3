"""Bank geometry: which blocks exist, their shapes, and what a path fetches (docs/method.md).

Level l (1-based) of a tree with branching b has b**l clusters; each cluster
owns one block per memory layer. A block of size r at one layer is, by kind:

    ffn       gate[d, r], up[d, r], down[r, d]                 3·r·d
    lora_ffn  A/B for gate, up (d→d_f) and down (d_f→d)          3·r·(d + d_f)
    lora_qk   A/B for the query and key projections            r·(2d + q_w + kv_w)
    lora_ov   A/B for the value and output projections         r·(d + kv_w + q_w + d)
    kv        keys[r, heads·head_dim], values[r, heads·head_dim]  2·r·h·d_h

Blocks of one level are stored together: `matrix[clusters, layers, ...]`, with
the rank axis sized r_l. A sequence's memory is its path's blocks concatenated
along the rank axis (inner width R = Σ r_l). With square attention (kv_w = q_w
= h·d_h) these are the paper's counts.
"""

from __future__ import annotations

import dataclasses
import math

from hmem_jax.config import ConfigError, HierarchyConfig, MemoryConfig, ModelConfig


@dataclasses.dataclass(frozen=True)
class MatrixSpec:
    """One matrix of a block at one layer: its shape with `None` marking the rank axis."""

    shape: tuple[int | None, ...]
    init: str  # 'normal' (std 1/sqrt(fan_in)), 'kaiming_uniform', or 'zeros'
    fan_in: int

    def at_rank(self, rank: int) -> tuple[int, ...]:
        return tuple(rank if s is None else s for s in self.shape)

    @property
    def rank_axis(self) -> int:
        return self.shape.index(None)


def matrix_specs(kind: str, model: ModelConfig) -> dict[str, MatrixSpec]:
    """The matrices of one block at one layer; the rank axis is `None`."""
    d, d_ff = model.d_model, model.d_ff
    q_w, kv_w = model.num_heads * model.head_dim, model.kv_heads * model.head_dim
    if kind == "ffn":
        # Every memory type starts with no effect: the down projection is zero.
        return {
            "gate": MatrixSpec((d, None), "normal", d),
            "up": MatrixSpec((d, None), "normal", d),
            "down": MatrixSpec((None, d), "zeros", 0),
        }

    def lora(name: str, fan_in: int, fan_out: int) -> dict[str, MatrixSpec]:
        return {
            f"{name}_a": MatrixSpec((fan_in, None), "kaiming_uniform", fan_in),
            f"{name}_b": MatrixSpec((None, fan_out), "zeros", 0),
        }

    if kind == "lora_ffn":
        return {**lora("gate", d, d_ff), **lora("up", d, d_ff), **lora("down", d_ff, d)}
    if kind == "lora_qk":
        return {**lora("q", d, q_w), **lora("k", d, kv_w)}
    if kind == "lora_ov":
        return {**lora("v", d, kv_w), **lora("o", q_w, d)}
    if kind == "kv":
        return {
            "keys": MatrixSpec((None, q_w), "normal", model.head_dim),
            "values": MatrixSpec((None, q_w), "zeros", 0),
        }
    raise ConfigError(f"MemoryConfig.kind = {kind!r} has no block layout.")


@dataclasses.dataclass(frozen=True)
class BankGeometry:
    """Sizes of a hierarchical memory bank; pure arithmetic, nothing allocated."""

    kind: str
    branching: int
    level_sizes: tuple[int, ...]
    layers: tuple[int, ...]  # which anchor layers carry memory
    matrices: dict[str, MatrixSpec]

    @classmethod
    def from_configs(
        cls, model: ModelConfig, memory: MemoryConfig, hierarchy: HierarchyConfig
    ) -> BankGeometry:
        if len(memory.level_sizes) != hierarchy.depth:
            raise ConfigError(
                f"MemoryConfig.level_sizes = {tuple(memory.level_sizes)} has "
                f"{len(memory.level_sizes)} levels but HierarchyConfig.depth = {hierarchy.depth}; "
                "give one size per level (0 for a level without memory)."
            )
        return cls(
            kind=memory.kind,
            branching=hierarchy.branching,
            level_sizes=tuple(int(r) for r in memory.level_sizes),
            layers=memory_layers(model.num_layers, memory),
            matrices=matrix_specs(memory.kind, model),
        )

    @property
    def depth(self) -> int:
        return len(self.level_sizes)

    @property
    def active_levels(self) -> tuple[int, ...]:
        """1-based levels that own memory (r_l > 0)."""
        return tuple(l for l, r in enumerate(self.level_sizes, start=1) if r > 0)

    @property
    def fetched_rank(self) -> int:
        """R = Σ r_l: the inner width one sequence's memory adds per layer."""
        return sum(self.level_sizes)

    def clusters(self, level: int) -> int:
        return self.branching**level

    def per_rank_params(self) -> int:
        """Parameters of a rank-1 block over all memory layers."""
        return len(self.layers) * sum(math.prod(m.at_rank(1)) for m in self.matrices.values())

    def block_params(self, level: int) -> int:
        return self.per_rank_params() * self.level_sizes[level - 1]

    def level_params(self, level: int) -> int:
        return self.block_params(level) * self.clusters(level)

    @property
    def bank_params(self) -> int:
        return sum(self.level_params(l) for l in range(1, self.depth + 1))

    @property
    def fetched_params(self) -> int:
        return self.per_rank_params() * self.fetched_rank

    @property
    def rank_axes(self) -> dict[str, int]:
        """Matrix name -> its rank axis within one layer's matrix."""
        return {name: spec.rank_axis for name, spec in self.matrices.items()}

    def block_shape(self, name: str, level: int) -> tuple[int, ...]:
        """Shape of one block's matrix `name` at `level`: [layers, ...]."""
        return (len(self.layers),) + self.matrices[name].at_rank(self.level_sizes[level - 1])

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "branching": self.branching,
            "level_sizes": list(self.level_sizes),
            "memory_layers": len(self.layers),
            "fetched_rank": self.fetched_rank,
            "clusters_per_level": [self.clusters(l) for l in range(1, self.depth + 1)],
            "bank_params": self.bank_params,
            "fetched_params": self.fetched_params,
            "params_per_level": [self.level_params(l) for l in range(1, self.depth + 1)],
        }


def memory_layers(num_layers: int, memory: MemoryConfig) -> tuple[int, ...]:
    """The anchor layers that carry memory, from `MemoryConfig.placement`."""
    if memory.placement == "all":
        return tuple(range(num_layers))
    if memory.placement_layers > num_layers:
        raise ConfigError(
            f"MemoryConfig.placement_layers = {memory.placement_layers} exceeds the "
            f"anchor's {num_layers} layers."
        )
    if memory.placement == "first":
        return tuple(range(memory.placement_layers))
    return tuple(range(num_layers - memory.placement_layers, num_layers))
