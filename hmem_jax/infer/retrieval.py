"""Route texts to cluster paths and assemble the model's `memory` input for them (docs/method.md).

Inference fetches once per input: the prompt (or question, or whole document)
is embedded, routed by greedy descent of the run's ClusterTree, and the
blocks on its path are fetched from the bank. Blocks come through a
`BlockSource` (`fetch(level_key, ids) -> matrices [U, layers, ...]`), so the
device-resident bank of a checkpoint and a streamed bank plug in alike.

Memory modes: 'none' (the anchor alone), 'generic' (the context-independent
generic block of co-training), 'fetched' (each input's own path). Blocking
(the paper's ablation): routing may exclude level-1 subtrees, so an input
whose best match is blocked descends into the nearest available subtree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from hmem_jax.bank import device as bank_lib
from hmem_jax.data.batch import block_slots_key
from hmem_jax.errors import MemoryModeError
from hmem_jax.hierarchy.routing import descend_one_level, squared_norms
from hmem_jax.train.memory import MemoryPlan

Array = jax.Array
MEMORY_MODES = ("none", "generic", "fetched")


class BlockSource(Protocol):
    """Any bank tier, read-only: the matrices of blocks `ids` (int32[U]) of one level."""

    def fetch(self, level_key: str, ids: np.ndarray) -> Mapping[str, Array]: ...


class DeviceBlocks:
    """A device-resident bank (`TrainState.bank`) as a BlockSource."""

    def __init__(self, bank: Mapping[str, bank_lib.LevelBank]) -> None:
        self.bank = bank

    def fetch(self, level_key: str, ids: np.ndarray) -> Mapping[str, Array]:
        if level_key not in self.bank:
            raise MemoryModeError(
                f"The bank has no level {level_key!r} (levels: {sorted(self.bank)}); "
                "the generic memory exists only when MemoryConfig.generic_probability "
                "> 0 during training."
            )
        return bank_lib.fetch(self.bank[level_key], jnp.asarray(ids, jnp.int32)).params


class StreamedBlocks:
    """A streamed bank (tensorstore store + host cache, hmem_jax/bank/streaming.py) as a
    BlockSource: the same blocks the training step fetched, read through the cache."""

    def __init__(self, bank: Any) -> None:
        self.bank = bank

    def fetch(self, level_key: str, ids: np.ndarray) -> Mapping[str, Array]:
        _, rows = self.bank.fetch({level_key: np.asarray(ids, np.int32)})[level_key]
        return {name: jnp.asarray(value) for name, value in rows.params.items()}


def route(
    tree: Any, embedder: Any, texts: Sequence[str], blocked_level1: Sequence[int] | np.ndarray = ()
) -> np.ndarray:
    """int32[N, depth] paths; blocked level-1 clusters are never entered.

    `blocked_level1`: cluster ids blocked for every text, or an int array [N]
    with one blocked cluster per text (-1 = none), as the blocking experiment
    blocks each prompt's own best subtree.
    """
    per_row = (
        isinstance(blocked_level1, np.ndarray)
        and blocked_level1.ndim == 1
        and len(blocked_level1) == len(texts)
        and len(texts) > 0
    )
    if not per_row and not len(blocked_level1):
        return np.asarray(tree.route_texts(list(texts), embedder), np.int32)
    tree.check_embedder(embedder)
    embeddings = np.asarray(embedder.embed(list(texts)), np.float32)
    level1 = tree.levels[0]
    distances = squared_norms(level1)[None, :] - 2.0 * embeddings @ level1.T
    if per_row:
        blocked = np.asarray(blocked_level1)
        rows = np.flatnonzero(blocked >= 0)
        distances[rows, blocked[rows]] = np.inf
    else:
        if len(blocked_level1) >= tree.branching:
            raise ValueError("Blocking every level-1 subtree leaves nothing to route to.")
        distances[:, list(blocked_level1)] = np.inf
    cluster = np.argmin(distances, axis=1).astype(np.int64)
    paths = np.empty((len(texts), tree.depth), np.int32)
    paths[:, 0] = cluster
    for depth_index in range(1, tree.depth):
        child, cluster = descend_one_level(
            embeddings, cluster, tree.levels[depth_index], tree.branching
        )
        paths[:, depth_index] = child
    return paths


def build_memory(
    plan: MemoryPlan | None, blocks: BlockSource | None, block_ids: np.ndarray, mode: str
) -> Any:
    """The model's memory input for inputs with block_ids int32[N, depth] (None for 'none')."""
    if mode not in MEMORY_MODES:
        raise MemoryModeError(f"memory mode {mode!r} is not one of {MEMORY_MODES}.")
    if mode == "none":
        return None
    if plan is None or blocks is None:
        raise MemoryModeError(
            f"memory mode {mode!r} needs a run trained with memory "
            "(MemoryConfig.kind != 'none'); use mode 'none' for an anchor-only run."
        )
    if plan.config.application != "gather":  # the same function; per-row memory is simpler here
        plan = dataclasses.replace(
            plan, config=dataclasses.replace(plan.config, application="gather")
        )
    block_ids = np.asarray(block_ids)
    params, batch = {}, {}
    for level in plan.levels:
        unique, slots = np.unique(block_ids[:, level - 1], return_inverse=True)
        params[bank_lib.level_key(level)] = blocks.fetch(bank_lib.level_key(level), unique)
        batch[block_slots_key(level)] = jnp.asarray(slots.reshape(-1), jnp.int32)
    use_generic = None
    if mode == "generic":
        params[bank_lib.GENERIC] = blocks.fetch(bank_lib.GENERIC, np.zeros((1,), np.int32))
        use_generic = jnp.ones((len(block_ids),), bool)
    one_shard = {key: {name: x[None] for name, x in rows.items()} for key, rows in params.items()}
    return plan.model_memory(one_shard, batch, use_generic)


def select_rows(memory: Any, rows: np.ndarray) -> Any:
    """The memory of a subset of inputs (memory leaves are [layers, N, ...])."""
    if memory is None:
        return None
    indices = jnp.asarray(rows)
    return jax.tree.map(lambda x: jnp.take(x, indices, axis=1), memory)
