"""How fetched memory enters the anchor (docs/method.md), per sequence.

The model receives `memory` as a pytree whose leaves have a leading layer
axis (scanned with the blocks) and a batch axis: each sequence computes with
its own path's memory. Layer-level pieces, by the keys present:

- FFN-memories (`gate`, `up`, `down`): extra SwiGLU hidden units. For one
  sequence, silu(x·G)⊙(x·U)·D added to the FFN output equals the anchor's FFN
  with G, U, D concatenated to its gate, up and down matrices.
- LoRA (`<m>_a`, `<m>_b` for m in q, k, v, o, gate, up, down): the projection
  m gains scale·(x·A)·B.
- KV-memories (`keys`, `values`): r extra key/value vectors per head that
  every query attends to, without causal mask or positions; the result is
  added to the attention output.

Two ways to apply FFN-memories (`MemoryConfig.application`):
- 'gather': per-sequence weights [B, d, R] built from the step's unique
  blocks (`sequence_memory`), then batched einsums;
- 'grouped': per level, tokens sorted by their sequence's block and one
  `jax.lax.ragged_dot` over the unique blocks (MoE-style dispatch), with no
  per-sequence copy of the weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
Memory = Mapping[str, Array]


# ----- layer-level application (inside the scanned block) ---------------------------------


def ffn_memory(x: Array, memory: Memory) -> Array:
    """x[B, T, d] -> extra SwiGLU units' output[B, T, d], per-sequence weights."""
    if "grouped" in memory:
        return grouped_ffn_memory(x, memory)
    return _swiglu(x, memory["gate"], memory["up"], memory["down"], "btd,bdr->btr", "btr,brd->btd")


def _swiglu(x: Array, gate: Array, up: Array, down: Array, into: str, out_of: str) -> Array:
    g = jnp.einsum(into, x, gate.astype(x.dtype))
    u = jnp.einsum(into, x, up.astype(x.dtype))
    return jnp.einsum(out_of, jax.nn.silu(g) * u, down.astype(x.dtype))


def lora(x: Array, memory: Memory, name: str, scale: float) -> Array | None:
    """scale·(x·A)·B for projection `name` with per-sequence A[B, in, R], B[B, R, out]; or None."""
    a = memory.get(f"{name}_a")
    if a is None:
        return None
    b = memory[f"{name}_b"]
    low = jnp.einsum("btd,bdr->btr", x, a.astype(x.dtype))
    return scale * jnp.einsum("btr,bro->bto", low, b.astype(x.dtype))


def add_lora(y: Array, x: Array, memory: Memory | None, name: str, scale: float) -> Array:
    delta = lora(x, memory, name, scale) if memory else None
    return y if delta is None else y + delta


def kv_memory_attention(q: Array, memory: Memory) -> Array:
    """q[B, T, N, H] attends to memory keys/values[B, R, N·H]: no mask, no positions."""
    batch, _, heads, head_dim = q.shape
    keys = memory["keys"].astype(q.dtype).reshape(batch, -1, heads, head_dim)
    values = memory["values"].astype(q.dtype).reshape(batch, -1, heads, head_dim)
    return jax.nn.dot_product_attention(q, keys, values)


def grouped_ffn_memory(x: Array, memory: Mapping[str, Any]) -> Array:
    """FFN-memories as one grouped matmul per level over the step's unique blocks.

    memory["grouped"][level] = {gate[U, d, r], up[U, d, r], down[U, r, d],
    slots int32[B]}. Sequences are ordered by slot, so each unique block's
    tokens form one contiguous group for `ragged_dot`; results go back in
    order. Sequences with `use_generic` get the shared generic block instead.
    """
    batch, length, d = x.shape
    fetched_weight = None
    if "use_generic" in memory:
        fetched_weight = (1.0 - memory["use_generic"].astype(x.dtype))[:, None, None]
    out = jnp.zeros_like(x)
    for level in memory["grouped"].values():
        slots = level["slots"]
        order = jnp.argsort(slots, stable=True)
        groups = jnp.bincount(slots, length=level["gate"].shape[0]).astype(jnp.int32) * length
        tokens = x[order].reshape(batch * length, d)
        gate = jax.lax.ragged_dot(tokens, level["gate"].astype(x.dtype), groups)
        up = jax.lax.ragged_dot(tokens, level["up"].astype(x.dtype), groups)
        down = jax.lax.ragged_dot(jax.nn.silu(gate) * up, level["down"].astype(x.dtype), groups)
        out = out.at[order].add(down.reshape(batch, length, d))
    if fetched_weight is not None:
        generic = memory["generic"]
        shared = _swiglu(
            x, generic["gate"], generic["up"], generic["down"], "btd,dr->btr", "btr,rd->btd"
        )
        out = out * fetched_weight + shared * (1.0 - fetched_weight)
    return out


# ----- step-level assembly (outside the model) --------------------------------------------


def sequence_memory(
    fetched: Mapping[int, Memory], slots: Mapping[int, Array], rank_axes: Mapping[str, int]
) -> dict[str, Array]:
    """Per-sequence memory[name] = [layers, B, ...R...] from unique blocks.

    fetched[level][name]: [U_l, layers, ...r_l...] unique blocks of the step;
    slots[level]: int32[B] each sequence's index into them; rank_axes[name]:
    the rank axis of one block's matrix (after the layer axis is dropped).
    Blocks of all levels are concatenated along the rank axis.
    """
    out = {}
    for name, rank_axis in rank_axes.items():
        parts = [jnp.take(fetched[level][name], slots[level], axis=0) for level in sorted(fetched)]
        per_sequence = jnp.concatenate(parts, axis=2 + rank_axis)  # [B, layers, ...]
        out[name] = jnp.swapaxes(per_sequence, 0, 1)
    return out


def grouped_memory(
    fetched: Mapping[int, Memory],
    slots: Mapping[int, Array],
    generic: Memory | None = None,
    use_generic: Array | None = None,
) -> dict:
    """Memory for the 'grouped' application: unique blocks per level, layer axis first.

    With a generic block, `generic[name]` is [1, layers, ...R...] and
    `use_generic` bool[B] picks the sequences that use it.
    """
    levels = {}
    layers = None
    for level in sorted(fetched):
        entry = {name: jnp.swapaxes(fetched[level][name], 0, 1) for name in ("gate", "up", "down")}
        layers = entry["gate"].shape[0]
        entry["slots"] = jnp.broadcast_to(slots[level], (layers,) + slots[level].shape)
        levels[f"l{level}"] = entry
    memory: dict[str, Any] = {"grouped": levels}
    if generic is not None:
        assert use_generic is not None, "a generic block needs use_generic"
        memory["generic"] = {name: generic[name][0] for name in ("gate", "up", "down")}
        memory["use_generic"] = jnp.broadcast_to(use_generic, (layers,) + use_generic.shape)
    return memory


def select_generic(
    per_sequence: dict[str, Array], generic: Memory, use_generic: Array
) -> dict[str, Array]:
    """Replace the memory of sequences with use_generic[B] by the generic block.

    per_sequence[name]: [layers, B, ...]; generic[name]: [1, layers, ...].
    """
    out = {}
    for name, value in per_sequence.items():
        shared = jnp.broadcast_to(jnp.swapaxes(generic[name], 0, 1), value.shape)
        mask = use_generic.reshape((1, -1) + (1,) * (value.ndim - 2))
        out[name] = jnp.where(mask, shared, value)
    return out


def place_layers(memory: dict, layers: tuple[int, ...], num_layers: int) -> dict:
    """Spread memory over all anchor layers: zeros (no effect) where none is placed."""
    if tuple(layers) == tuple(range(num_layers)):
        return memory
    index = jnp.asarray(layers)

    def spread(value: Array) -> Array:
        full = jnp.zeros((num_layers,) + value.shape[1:], value.dtype)
        return full.at[index].set(value)

    return jax.tree.map(spread, memory)
