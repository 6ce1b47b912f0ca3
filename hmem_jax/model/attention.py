"""Causal self-attention within packed documents, by one of several implementations.

`attend` is the one entry point (`ModelConfig.attention` picks the implementation):

- 'xla': `jax.nn.dot_product_attention` with the dense document-causal mask[B, 1, T, T]. It
  holds the [B, N, T, T] scores (and, training, their gradient), which at T = 8,192 is 256 MiB
  per head in float32; it is the reference the others are tested against.
- 'chunked': flash-style attention in plain JAX, for any backend: an online softmax over key
  blocks, key blocks above the diagonal skipped, and a custom VJP that recomputes each block's
  probabilities from the saved log-sum-exp, so neither pass holds more than a
  [block, block] tile of scores per head.
- 'cudnn': cuDNN's fused flash attention (NVIDIA Hopper or later, float16/bfloat16) in its
  packed layout: each row's documents are given as start offsets and lengths, so no mask
  exists at all. Its static tables hold `max_documents` documents per row; a batch with a
  row holding more runs 'chunked' instead (chosen on the device, per step).
- 'splash': Pallas splash attention for TPU, a causal mask with `SegmentIds`, one
  multi-query kernel per key/value head; run per shard under the current mesh.
- 'auto': picked from the platform the computation is traced for (the current mesh's
  devices, else the default backend): 'xla' on CPU, so CPU runs compute exactly what they
  always did; 'cudnn' on an NVIDIA GPU where its shapes and dtype allow, else 'chunked';
  'splash' on TPU where the length divides into its blocks, else 'chunked'.

Training passes `segment_ids`; only 'xla' builds a mask from them. Decoding with a KV cache
(hmem_jax/model/cache.py) runs `cached_attention` on every backend: its dense mask[B, 1, T, S]
and the cache's filled key blocks only, with the online softmax of 'chunked'.

Shapes: q[B, T, N, H], k and v [B, S, K, H] with N a multiple of K (grouped-query
attention), out[B, T, N, H]. Segment id 0 marks padding, which attends only to padding.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hmem_jax.config import ATTENTION_IMPLEMENTATIONS
from hmem_jax.model.platform import traced_platform

Array = jax.Array

# Masked scores: finite, so a row with nothing visible averages its values (as 'xla' does)
# instead of turning into NaN; its exp underflows to 0 next to any visible score.
_MASKED = -0.7 * float(np.finfo(np.float32).max)
_SPLASH_LANES = 128  # a TPU splash block is a multiple of this


def document_causal_mask(segment_ids: Array) -> Array:
    """mask[B, 1, T, T]: query t may attend key s iff s <= t and both are in the same document.

    Segment id 0 marks padding; padding attends only to padding, so its rows
    stay finite, and the loss ignores it.
    """
    length = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same_doc)[:, None]


def attend(
    q: Array,
    k: Array,
    v: Array,
    segment_ids: Array,
    *,
    implementation: str = "xla",
    block: int = 512,
    max_documents: int = 64,
) -> Array:
    """Self-attention of q over k/v, causal within the documents of `segment_ids[B, T]`.

    `block`: the query/key tile of 'chunked' and 'splash'; `max_documents`: how many
    documents a row may hold in 'cudnn''s tables. (Decoding through a KV cache is
    `cached_attention`.)
    """
    chosen = resolve(implementation, q, block)
    if chosen == "xla":
        return jax.nn.dot_product_attention(q, k, v, mask=document_causal_mask(segment_ids))
    segments = segment_ids.astype(jnp.int32)
    if chosen == "chunked":
        return chunked_attention(q, k, v, segments, block)
    if chosen == "cudnn":
        return cudnn_attention(q, k, v, segments, max_documents, block)
    if chosen == "splash":
        return splash_attention(q, k, v, segments, block)
    raise ValueError(
        f"Unknown attention implementation {implementation!r}: {ATTENTION_IMPLEMENTATIONS}."
    )


def _platform() -> str:
    return traced_platform()


def resolve(implementation: str, q: Array, block: int) -> str:
    """The implementation `implementation` stands for with queries like `q` (see the module
    docstring for what 'auto' picks)."""
    if implementation != "auto":
        return implementation
    platform = _platform()
    if platform == "cpu":
        return "xla"
    if platform == "gpu":
        return "cudnn" if _cudnn_supports(q) else "chunked"
    if platform == "tpu":
        length = q.shape[1]
        tile = min(block, length)
        return "splash" if length % tile == 0 and tile % _SPLASH_LANES == 0 else "chunked"
    return "chunked"


# ----------------------------------------------------------------------------- chunked


def chunked_attention(q: Array, k: Array, v: Array, segment_ids: Array, block: int) -> Array:
    """Flash-style causal attention within documents, in [block, block] tiles of scores.

    The length is padded to a multiple of the tile with segment id -1 (attending only to
    itself) and the padding cut off again.
    """
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    tile = min(block, length)
    padded = -(-length // tile) * tile
    if padded != length:
        extra = [(0, 0), (0, padded - length), (0, 0), (0, 0)]
        q, k, v = (jnp.pad(x, extra) for x in (q, k, v))
        segment_ids = jnp.pad(segment_ids, extra[:2], constant_values=-1)
    grouped = q.reshape(batch, padded, kv_heads, heads // kv_heads, head_dim)
    out = _flash(grouped, k, v, segment_ids, tile)
    return out.reshape(batch, padded, heads, head_dim)[:, :length]


def _tile(x: Array, index: Array, tile: int) -> Array:
    return jax.lax.dynamic_slice_in_dim(x, index * tile, tile, axis=1)


def _scores(
    q: Array, k: Array, q_seg: Array, k_seg: Array, i: Array, j: Array, tile: int
) -> tuple[Array, Array]:
    """float32 scores[B, K, G, tq, tk] of query tile i against key tile j, masked, and the
    visibility[B, 1, 1, tq, tk] they were masked by."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = jnp.einsum("bqkgh,bskh->bkgqs", q, k, preferred_element_type=jnp.float32) * scale
    offsets = jnp.arange(tile)
    causal = (i * tile + offsets)[:, None] >= (j * tile + offsets)[None, :]
    visible = (causal[None] & (q_seg[:, :, None] == k_seg[:, None, :]))[:, None, None]
    return jnp.where(visible, s, _MASKED), visible


def _flash_forward(
    q: Array, k: Array, v: Array, segment_ids: Array, tile: int
) -> tuple[Array, Array]:
    """out[B, T, K, G, H] and the float32 log-sum-exp[B, K, G, T] of each query's scores."""
    batch, length, kv_heads, groups, head_dim = q.shape

    def query_tile(i: Array) -> tuple[Array, Array]:
        qi, si = _tile(q, i, tile), _tile(segment_ids, i, tile)

        def key_tile(j: Array, carry: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
            s, _ = _scores(qi, _tile(k, j, tile), si, _tile(segment_ids, j, tile), i, j, tile)
            return _online_softmax_step(carry, s, _tile(v, j, tile))

        stats = (batch, kv_heads, groups, tile)
        init = (
            jnp.full(stats, _MASKED, jnp.float32),
            jnp.zeros(stats, jnp.float32),
            jnp.zeros(stats + (head_dim,), jnp.float32),
        )
        top, total, acc = jax.lax.fori_loop(0, i + 1, key_tile, init)  # tiles j <= i only
        return acc / total[..., None], top + jnp.log(total)

    outs, lses = jax.lax.map(query_tile, jnp.arange(length // tile))
    # outs[tiles, B, K, G, tile, H], lses[tiles, B, K, G, tile]
    out = jnp.transpose(outs, (1, 0, 4, 2, 3, 5)).reshape(q.shape)
    lse = jnp.transpose(lses, (1, 2, 3, 0, 4)).reshape(batch, kv_heads, groups, length)
    return out.astype(q.dtype), lse


def _online_softmax_step(
    carry: tuple[Array, Array, Array], s: Array, v: Array
) -> tuple[Array, Array, Array]:
    """One key block of the online softmax: the running (max, sum of exponentials, weighted
    values) of each query, updated by the block's masked float32 scores s[B, K, G, q, s] and
    its values v[B, s, K, H]."""
    top, total, acc = carry
    new_top = jnp.maximum(top, s.max(-1))
    p = jnp.exp(s - new_top[..., None])
    shrink = jnp.exp(top - new_top)
    pv = jnp.einsum("bkgqs,bskh->bkgqh", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return new_top, total * shrink + p.sum(-1), acc * shrink[..., None] + pv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q: Array, k: Array, v: Array, segment_ids: Array, tile: int) -> Array:
    return _flash_forward(q, k, v, segment_ids, tile)[0]


def _flash_fwd(
    q: Array, k: Array, v: Array, segment_ids: Array, tile: int
) -> tuple[Array, tuple[Array, ...]]:
    out, lse = _flash_forward(q, k, v, segment_ids, tile)
    return out, (q, k, v, segment_ids, out, lse)


def _flash_bwd(
    tile: int, residuals: tuple[Array, ...], d_out: Array
) -> tuple[Array, Array, Array, None]:
    """Per key tile j, the query tiles i >= j: each tile's probabilities are recomputed from
    the log-sum-exp, dk/dv summed over them and dq accumulated into its rows."""
    q, k, v, segment_ids, out, lse = residuals
    length = q.shape[1]
    # D = rowsum(dO * O) [B, K, G, T]: the softmax's backward needs it per query.
    delta = jnp.einsum("btkgh,btkgh->bkgt", d_out, out, preferred_element_type=jnp.float32)
    tiles = length // tile

    def key_tile(dq: Array, j: Array) -> tuple[Array, tuple[Array, Array]]:
        kj, vj, sj = _tile(k, j, tile), _tile(v, j, tile), _tile(segment_ids, j, tile)

        def query_tile(i: Array, carry: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
            dq, dk, dv = carry
            qi, doi = _tile(q, i, tile), _tile(d_out, i, tile)
            s, visible = _scores(qi, kj, _tile(segment_ids, i, tile), sj, i, j, tile)
            rows = jax.lax.dynamic_slice_in_dim(lse, i * tile, tile, axis=3)
            p = jnp.exp(s - rows[..., None])
            dv = dv + jnp.einsum(
                "bkgqs,bqkgh->bskh", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32
            )
            dp = jnp.einsum("bqkgh,bskh->bkgqs", doi, vj, preferred_element_type=jnp.float32)
            d_rows = jax.lax.dynamic_slice_in_dim(delta, i * tile, tile, axis=3)
            ds = jnp.where(visible, p * (dp - d_rows[..., None]), 0.0) / math.sqrt(q.shape[-1])
            dk = dk + jnp.einsum(
                "bkgqs,bqkgh->bskh", ds.astype(qi.dtype), qi, preferred_element_type=jnp.float32
            )
            dqi = jnp.einsum(
                "bkgqs,bskh->bqkgh", ds.astype(kj.dtype), kj, preferred_element_type=jnp.float32
            )
            dq = jax.lax.dynamic_update_slice_in_dim(dq, _tile(dq, i, tile) + dqi, i * tile, axis=1)
            return dq, dk, dv

        zeros = jnp.zeros(kj.shape, jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(j, tiles, query_tile, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq, (dks, dvs) = jax.lax.scan(key_tile, jnp.zeros(q.shape, jnp.float32), jnp.arange(tiles))

    def untile(x: Array) -> Array:  # [tiles, B, tile, K, H] -> [B, T, K, H]
        return jnp.moveaxis(x, 0, 1).reshape(k.shape)

    return dq.astype(q.dtype), untile(dks).astype(k.dtype), untile(dvs).astype(v.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- cached


def cached_attention(
    q: Array,
    keys: Array,
    values: Array,
    layer: Array,
    mask: Array,
    filled: Array,
    block: int = 128,
) -> Array:
    """Attention of q[B, T, N, H] over the filled slots [0, `filled`) of one layer of a KV
    cache (`keys`/`values`: [layers, B, S, K, H], this layer's index `layer`), as the dense
    `mask[B, 1, T, S]` allows: the decoding path.

    Key blocks of `block` slots are read straight out of the whole cache, and only as many
    as are filled, with the online softmax of 'chunked': a decode step reads the keys and
    values written so far, once, instead of copying this layer's whole S slots out of the
    cache and attending over all of them (empty slots included). Its cost grows with the
    tokens generated so far, not with the room the cache was made with. The block is small
    (128 slots) because a step reads the filled slots rounded up to it: at 2,048 slots, 64
    filled, a `tiny` batch-8 step takes ~1.6 ms against ~25 ms over the whole cache. A cache
    of at most one block is attended densely, which at that size is cheaper than the loop.
    """
    batch, length, heads, head_dim = q.shape
    slots, kv_heads = keys.shape[2], keys.shape[3]
    if slots <= block:  # a short cache is one block: the dense path costs no loop
        k, v = (
            jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=False).astype(q.dtype)
            for x in (keys, values)
        )
        return jax.nn.dot_product_attention(q, k, v, mask=mask)
    tile = block
    grouped = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    scale = 1.0 / math.sqrt(head_dim)
    zero = jnp.zeros((), jnp.int32)

    def key_block(j: Array, carry: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
        # The last block is moved back to end at S; slots an earlier block had are left out.
        start = jnp.minimum(j * tile, slots - tile)
        where = (layer, zero, start, zero, zero)
        k, v = (
            jax.lax.dynamic_slice(x, where, (1, batch, tile, kv_heads, head_dim))[0]
            for x in (keys, values)
        )
        fresh = (start + jnp.arange(tile)) >= j * tile
        visible = jax.lax.dynamic_slice_in_dim(mask, start, tile, axis=3) & fresh
        s = jnp.einsum(
            "bqkgh,bskh->bkgqs", grouped, k.astype(q.dtype), preferred_element_type=jnp.float32
        )
        s = jnp.where(visible[:, :, None], s * scale, _MASKED)
        return _online_softmax_step(carry, s, v.astype(q.dtype))

    stats = (batch, kv_heads, heads // kv_heads, length)
    init = (
        jnp.full(stats, _MASKED, jnp.float32),
        jnp.zeros(stats, jnp.float32),
        jnp.zeros(stats + (head_dim,), jnp.float32),
    )
    blocks = (jnp.minimum(filled, slots) + tile - 1) // tile
    _, total, acc = jax.lax.fori_loop(0, blocks, key_block, init)
    out = acc / total[..., None]  # [B, K, G, T, H]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(q.shape).astype(q.dtype)


# ----------------------------------------------------------------------------- cudnn


def _cudnn_supports(q: Array) -> bool:
    """Whether cuDNN's packed flash attention takes queries like `q` on this GPU."""
    # CUDA devices give "major.minor"; other GPUs give something else or nothing.
    capability = str(getattr(jax.local_devices(backend="gpu")[0], "compute_capability", ""))
    cuda = re.fullmatch(r"(\d+)\.(\d+)", capability)
    head_dim = q.shape[-1]
    return (
        cuda is not None
        and (int(cuda[1]), int(cuda[2])) >= (9, 0)  # the packed layout needs Hopper
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and head_dim % 8 == 0
        and head_dim <= 256
    )


def document_tables(segment_ids: Array, max_documents: int) -> tuple[Array, Array, Array]:
    """cuDNN's packed layout of each row: (lengths[B, M], offsets[B, M + 1], fits).

    A document is a run of equal segment ids (as packing writes them; a padding run is one
    too, so every token is covered: cuDNN leaves uncovered rows undefined). offsets hold each
    document's first token, lengths its token count; unused entries (and the last column,
    which jax's cuDNN wrapper fills with the batch's end) are -1. `fits`: every row has at
    most M = `max_documents` documents.
    """
    length = segment_ids.shape[1]
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
        axis=1,
    )
    count = starts.sum(axis=1, keepdims=True)
    # Each document's first token, then the row's end: [B, M + 1].
    bounds = jax.vmap(lambda row: jnp.nonzero(row, size=max_documents + 1, fill_value=length)[0])(
        starts
    )
    slot = jnp.arange(max_documents + 1)[None]
    used = (slot < count) & (slot < max_documents)
    offsets = jnp.where(used, bounds, -1)
    lengths = jnp.where(used[:, :-1], bounds[:, 1:] - bounds[:, :-1], -1)
    return lengths.astype(jnp.int32), offsets.astype(jnp.int32), jnp.all(count <= max_documents)


def cudnn_attention(
    q: Array, k: Array, v: Array, segment_ids: Array, max_documents: int, block: int
) -> Array:
    """cuDNN flash attention over the packed layout; 'chunked' (tile `block`) for a batch
    with more than `max_documents` documents in a row."""
    # jax.nn.dot_product_attention takes no document offsets, so this is its private module.
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    lengths, offsets, fits = document_tables(segment_ids, max_documents)
    groups = q.shape[2] // k.shape[2]

    def packed(q: Array, k: Array, v: Array) -> Array:
        # jax (0.10 at least) scales key offsets by the query's head count: give k/v as many.
        k, v = (jnp.repeat(x, groups, axis=2) for x in (k, v))
        return cudnn.dot_product_attention(
            q,
            k,
            v,
            q_seqlen=lengths,
            kv_seqlen=lengths,
            q_offsets=offsets,
            kv_offsets=offsets,
            scale=1.0 / math.sqrt(q.shape[-1]),
            mask_type=cudnn.MaskType.PADDING_CAUSAL,
        )

    def chunked(q: Array, k: Array, v: Array) -> Array:
        return chunked_attention(q, k, v, segment_ids, block)

    return jax.lax.cond(fits, packed, chunked, q, k, v)


# ----------------------------------------------------------------------------- splash


def splash_attention(q: Array, k: Array, v: Array, segment_ids: Array, block: int) -> Array:
    """Pallas splash attention (TPU; interpreted elsewhere, which is slow but exact)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    tile = min(block, length)
    if length % tile or tile % _SPLASH_LANES:
        raise ValueError(
            f"splash attention needs a tile (min(block, length) = {tile}) that divides the "
            f"length {length} and is a multiple of {_SPLASH_LANES}."
        )
    sizes = splash.BlockSizes(
        block_q=tile,
        block_kv=tile,
        block_kv_compute=tile,
        block_q_dkv=tile,
        block_kv_dkv=tile,
        block_kv_dkv_compute=tile,
        block_q_dq=tile,
        block_kv_dq=tile,
    )
    kernel = splash.make_splash_mqa_single_device(
        splash.MultiHeadMask([splash.CausalMask((length, length))] * groups),
        block_sizes=sizes,
        interpret=_platform() != "tpu",
    )

    def one_row(q: Array, k: Array, v: Array, segments: Array) -> Array:
        # q[T, n, H] -> per key/value head [k, G, T, H] against its k/v [k, T, H], with this
        # shard's n = k * G heads.
        shard_heads, shard_kv_heads = q.shape[1], k.shape[1]
        grouped = (q / math.sqrt(head_dim)).reshape(length, shard_kv_heads, groups, head_dim)
        ids = splash.SegmentIds(q=segments, kv=segments)
        out = jax.vmap(kernel, in_axes=(0, 0, 0, None))(
            jnp.transpose(grouped, (1, 2, 0, 3)),
            jnp.transpose(k, (1, 0, 2)),
            jnp.transpose(v, (1, 0, 2)),
            ids,
        )
        return jnp.transpose(out, (2, 0, 1, 3)).reshape(length, shard_heads, head_dim)

    return _per_shard(jax.vmap(one_row), q, k, v, segment_ids)


def _per_shard(
    fn: Callable[[Array, Array, Array, Array], Array],
    q: Array,
    k: Array,
    v: Array,
    segment_ids: Array,
) -> Array:
    """`fn` on each device's rows and heads under the current mesh (a Pallas kernel has no
    partitioning rule); the length is gathered, since causality spans it."""
    if jax.sharding.get_abstract_mesh().empty:
        return fn(q, k, v, segment_ids)
    q_spec = nn.logical_to_mesh_axes(("batch", None, "heads", "head_dim"))
    kv_spec = nn.logical_to_mesh_axes(("batch", None, "kv_heads", "head_dim"))
    row_spec = nn.logical_to_mesh_axes(("batch", None))
    return jax.shard_map(
        fn, in_specs=(q_spec, kv_spec, kv_spec, row_spec), out_specs=q_spec, check_vma=False
    )(q, k, v, segment_ids)
