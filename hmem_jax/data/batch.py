"""The batch schema: the keys of a training batch, defined once.

The loader (`data/loader.py`) produces these arrays, the training loop places
them on the mesh, `train.memory.MemoryPlan` reads the block arrays and
inference (`infer/retrieval.py`, `infer/decode.py`) builds the same keys for
prompts. A batch of b local rows of T tokens holds:

- `tokens`: int32[b, T];
- `segment_ids`: int32[b, T], the document pieces of a packed sequence
  numbered 1, 2, ...; 0 marks padding;
- `positions`: int32[b, T], restarting at 0 for each segment, 0 on padding;
- with a cluster tree, `paths`: int32[b, depth], each sequence's child index
  per level (read on the host, never sent to the devices);
- and per memory level l = 1..depth:
  - `block_ids_l{l}`: int32[S_local, capacity_l], for each of this process's
    batch shards the sorted unique global block ids its sequences use, padded
    to a static capacity with the level's block count (one past the largest
    id: out of range, so JAX scatters drop it and a clamping gather only
    fills a slot no sequence points at; never -1, which would wrap);
  - `block_slots_l{l}`: int32[b], each sequence's index into its own shard's
    `block_ids_l{l}` row;
  - `block_union_l{l}`: int32[union_l], the sorted unique ids of the whole
    global batch, the same on every process: what a host bank tier reads.
"""

from __future__ import annotations

TOKENS = "tokens"
SEGMENT_IDS = "segment_ids"
POSITIONS = "positions"
PATHS = "paths"

MODEL_INPUTS = (TOKENS, SEGMENT_IDS, POSITIONS)
"""What the model reads of every sequence; every other key is for the memory plan or the host."""


def block_ids_key(level: int) -> str:
    """Per batch shard, the level's distinct block ids (padded)."""
    return f"block_ids_l{level}"


def block_slots_key(level: int) -> str:
    """Per sequence, its index into its shard's `block_ids_key(level)` row."""
    return f"block_slots_l{level}"


def block_union_key(level: int) -> str:
    """The level's distinct block ids over the whole global batch (padded)."""
    return f"block_union_l{level}"
