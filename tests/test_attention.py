"""The attention implementations equal the dense 'xla' reference, in values and gradients."""

import dataclasses
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.mesh import AbstractDevice

from hmem_jax.config import ConfigError, ModelConfig
from hmem_jax.model import Transformer, attention
from hmem_jax.model.attention import attend, document_causal_mask, document_tables
from hmem_jax.model.cache import init_cache
from hmem_jax.train.step import loss_sums

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8


def _packed_segments(length: int) -> np.ndarray:
    """Three rows: documents of uneven lengths, then padding; padding, then documents; all
    padding."""
    first = np.repeat([1, 2, 3], [length // 3, length // 4, length // 3])
    first = np.pad(first, (0, length - first.size))
    second = np.repeat([0, 1, 2, 3], [length // 8, length // 6, length // 3, length // 8])
    second = np.pad(second, (0, length - second.size), constant_values=4)
    return np.stack([first, second, np.zeros(length, int)]).astype(np.int32)


def _qkv(length: int, seed: int = 0) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(seed)
    rows = 3
    q = rng.normal(size=(rows, length, HEADS, HEAD_DIM))
    k, v = (rng.normal(size=(rows, length, KV_HEADS, HEAD_DIM)) for _ in range(2))
    cotangent = rng.normal(size=q.shape)
    return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v, cotangent))


def _value_and_grads(implementation: str, segments: np.ndarray, block: int, *arrays):
    q, k, v, cotangent = arrays

    def weighted(q, k, v):
        out = attend(q, k, v, jnp.asarray(segments), implementation=implementation, block=block)
        return jnp.sum(out * cotangent), out

    (_, out), grads = jax.jit(jax.value_and_grad(weighted, (0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def _assert_close(actual, expected, rtol=1e-5):
    """float32 agreement: relative to the reference's largest magnitude."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert np.isfinite(actual).all()
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


@pytest.mark.parametrize(
    "implementation, length, block",
    [
        ("chunked", 96, 32),  # several tiles, the length a multiple of them
        ("chunked", 90, 32),  # padded to a multiple of the tile
        ("chunked", 40, 512),  # one tile, shorter than the block
        ("splash", 256, 128),  # Pallas interpret mode off TPU
    ],
)
def test_implementation_equals_xla_in_values_and_gradients(implementation, length, block):
    segments = _packed_segments(length)
    arrays = _qkv(length)
    out, grads = _value_and_grads(implementation, segments, block, *arrays)
    ref_out, ref_grads = _value_and_grads("xla", segments, block, *arrays)
    _assert_close(out, ref_out)
    for grad, ref in zip(grads, ref_grads):
        _assert_close(grad, ref)


@pytest.mark.parametrize("filled, block", [(90, 32), (90, 512), (7, 32), (100, 32), (100, 64)])
def test_cached_attention_reads_the_filled_blocks_and_equals_the_dense_masked_path(filled, block):
    """The decoding path over a cache of 100 slots (not a multiple of the block: the last
    block is moved back and its overlap left out), 3 new tokens per row, left-padded rows:
    equal to 'xla' over the whole cache with the same mask, and blind to slots past
    `filled`."""
    from hmem_jax.model.attention import cached_attention

    slots, new, layers, layer = 100, 3, 3, 1
    rng = np.random.default_rng(1)
    cache_k, cache_v = (
        jnp.asarray(rng.normal(size=(layers, 3, slots, KV_HEADS, HEAD_DIM)), jnp.float32)
        for _ in range(2)
    )
    q = jnp.asarray(rng.normal(size=(3, new, HEADS, HEAD_DIM)), jnp.float32)
    key_segments = np.ones((3, slots), np.int32)
    key_segments[1, : min(20, filled - new)] = 0  # left padding of a shorter prompt
    key_segments[:, filled:] = 0  # empty slots
    query_slots = filled - new + np.arange(new)
    causal = np.arange(slots)[None, :] <= query_slots[:, None]
    same = key_segments[:, None, :] == 1  # the new tokens belong to document 1
    mask = jnp.asarray((causal[None] & same)[:, None])
    out = jax.jit(cached_attention, static_argnums=(6,))(
        q, cache_k, cache_v, jnp.int32(layer), mask, jnp.int32(filled), block
    )
    reference = jax.nn.dot_product_attention(q, cache_k[layer], cache_v[layer], mask=mask)
    _assert_close(out, reference)
    garbage = cache_k.at[:, :, filled:].set(1e6)  # slots never filled are never read
    again = cached_attention(q, garbage, cache_v, jnp.int32(layer), mask, jnp.int32(filled), block)
    _assert_close(again, reference)


def test_auto_is_xla_on_cpu_and_picks_by_the_mesh_platform():
    q = jnp.zeros((1, 256, HEADS, HEAD_DIM))
    assert attention.resolve("auto", q, 512) == "xla"
    assert attention.resolve("chunked", q, 512) == "chunked"
    # An ahead-of-time compile for TPU traces under a TPU mesh on a CPU host.
    tpu = jax.sharding.AbstractMesh(
        (1,), ("data",), abstract_device=AbstractDevice("TPU v5e", None, "tpu")
    )
    with jax.sharding.use_abstract_mesh(tpu):
        assert attention.resolve("auto", q, 512) == "splash"
        assert attention.resolve("auto", q[:, :200], 512) == "chunked"  # no 128-multiple tile


def test_the_auto_compute_dtype_is_bfloat16_on_accelerators_and_float32_on_cpu():
    """The paper presets keep float32 masters and compute in 'auto'."""
    from hmem_jax.config import model_preset
    from hmem_jax.model.platform import compute_dtype

    preset = model_preset("160m")
    assert (preset.param_dtype, preset.dtype) == ("float32", "auto")
    assert compute_dtype("auto") == jnp.float32 and compute_dtype("bfloat16") == jnp.bfloat16
    for platform, kind in (("tpu", "TPU v5e"), ("gpu", "NVIDIA H100")):
        mesh = jax.sharding.AbstractMesh(
            (1,), ("data",), abstract_device=AbstractDevice(kind, None, platform)
        )
        with jax.sharding.use_abstract_mesh(mesh):
            assert compute_dtype("auto") == jnp.bfloat16


@pytest.mark.parametrize(
    "capability, dtype, head_dim, expected",
    [
        ("9.0", jnp.bfloat16, 64, "cudnn"),
        ("10.0", jnp.float16, 256, "cudnn"),
        ("8.0", jnp.bfloat16, 64, "chunked"),  # the packed layout needs Hopper
        ("9.0", jnp.float32, 64, "chunked"),
        ("9.0", jnp.bfloat16, 12, "chunked"),
        ("gfx942", jnp.bfloat16, 64, "chunked"),  # not CUDA
    ],
)
def test_auto_on_a_gpu_is_cudnn_where_it_applies(
    monkeypatch, capability, dtype, head_dim, expected
):
    device = types.SimpleNamespace(compute_capability=capability)
    monkeypatch.setattr(attention, "_platform", lambda: "gpu")
    monkeypatch.setattr(jax, "local_devices", lambda backend=None: [device])
    assert attention.resolve("auto", jnp.zeros((1, 64, 2, head_dim), dtype), 512) == expected


def test_splash_runs_per_shard_under_a_mesh():
    """Rows over 'data', heads (and their kv heads) over 'tensor', as `MeshConfig.rules` do."""
    length = 128
    segments = _packed_segments(length)[:2]
    q, k, v, _ = (x[:2] for x in _qkv(length))
    axes = ("data", "tensor")
    mesh = jax.make_mesh((2, 2), axes, axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = (("batch", "data"), ("heads", "tensor"), ("kv_heads", "tensor"), ("head_dim", None))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        out = jax.jit(
            lambda q, k, v: attend(
                q, k, v, segment_ids=jnp.asarray(segments), implementation="splash", block=128
            )
        )(q, k, v)
    expected = attend(q, k, v, segment_ids=jnp.asarray(segments))
    _assert_close(out, expected)


def test_document_tables_describe_the_document_causal_mask():
    """cuDNN's packed layout (offsets[B, M + 1] of document starts, lengths[B, M], -1 where
    unused, as jax's cuDNN wrapper takes them) covers every token, padding runs included."""
    segments = _packed_segments(40)[:2]
    tables = jax.jit(document_tables, static_argnums=1)
    lengths, offsets, fits = (np.asarray(x) for x in tables(jnp.asarray(segments), 6))
    assert fits and offsets.shape == (2, 7) and lengths.shape == (2, 6)
    implied = np.zeros((2, 40, 40), bool)
    for row in range(2):
        used = lengths[row] >= 0
        assert (offsets[row, :6][~used] == -1).all() and offsets[row, 6] == -1
        assert lengths[row][used].sum() == 40
        for start, size in zip(offsets[row][:6][used], lengths[row][used]):
            implied[row, start : start + size, start : start + size] = np.tril(
                np.ones((size, size), bool)
            )
    np.testing.assert_array_equal(implied, np.asarray(document_causal_mask(segments))[:, 0])
    assert not tables(jnp.asarray(segments), 4)[2]  # the second row has 5 runs


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_equals_xla_in_bfloat16():
    length = 256
    segments = _packed_segments(length)
    arrays = tuple(x.astype(jnp.bfloat16) for x in _qkv(length))
    out, grads = _value_and_grads("cudnn", segments, 128, *arrays)
    ref_out, ref_grads = _value_and_grads("xla", segments, 128, *arrays)
    # bfloat16 keeps 8 bits of mantissa; the two sum in different orders.
    _assert_close(out.astype(jnp.float32), ref_out.astype(jnp.float32), rtol=2e-2)
    for grad, ref in zip(grads, ref_grads):
        _assert_close(grad.astype(jnp.float32), ref.astype(jnp.float32), rtol=2e-2)


SMALL = ModelConfig(
    vocab_size=61,
    num_layers=2,
    d_model=32,
    num_heads=HEADS,
    num_kv_heads=KV_HEADS,
    head_dim=HEAD_DIM,
    d_ff=48,
    attention="xla",
    attention_block=8,
)


def _batch(length: int = 30) -> dict[str, jax.Array]:
    segments = _packed_segments(length)
    rng = np.random.default_rng(3)
    tokens = rng.integers(1, SMALL.vocab_size, segments.shape) * (segments > 0)
    starts = np.concatenate([np.ones((3, 1), bool), segments[:, 1:] != segments[:, :-1]], 1)
    index = np.arange(length)[None].repeat(3, 0)
    first = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    positions = (index - first) * (segments > 0)
    return {
        "tokens": jnp.asarray(tokens, jnp.int32),
        "segment_ids": jnp.asarray(segments),
        "positions": jnp.asarray(positions, jnp.int32),
    }


@pytest.mark.parametrize("qk_norm, remat", [("full", "none"), ("per_head", "full")])
def test_chunked_model_equals_xla_model_in_loss_and_gradients(qk_norm, remat):
    batch = _batch()
    ids = jnp.zeros((1, 8), jnp.int32)
    cfg = ModelConfig(**{**SMALL.__dict__, "qk_norm": qk_norm, "remat": remat})
    params = jax.jit(Transformer(cfg).init)(jax.random.key(0), ids, ids + 1, ids)["params"]
    results = []
    for implementation in ("xla", "chunked"):
        model = Transformer(dataclasses.replace(cfg, attention=implementation))

        def mean_loss(params, model=model):
            total, count = loss_sums(model, params, batch)
            return total / count

        results.append(jax.jit(jax.value_and_grad(mean_loss))(params))
    (loss, grads), (ref_loss, ref_grads) = results[1], results[0]
    _assert_close(loss, ref_loss)
    for grad, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        _assert_close(grad, ref)


def test_a_chunked_model_decodes_through_its_cache_as_its_forward_pass():
    cfg = dataclasses.replace(SMALL, attention="chunked")
    model = Transformer(cfg)
    batch = _batch(12)
    ids = jnp.zeros((1, 8), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), ids, ids + 1, ids)["params"]
    tokens, segments, positions = batch["tokens"][:1], batch["segment_ids"][:1], batch["positions"]
    full = jax.jit(model.apply)({"params": params}, tokens, segments, positions[:1])
    extend = jax.jit(lambda *args: model.apply(*args, method=Transformer.extend))
    cached, _ = extend({"params": params}, tokens, segments, positions[:1], init_cache(cfg, 1, 12))
    _assert_close(cached, full)


def test_a_bad_attention_setting_is_named():
    with pytest.raises(ConfigError, match="attention"):
        ModelConfig(attention="flash")
    with pytest.raises(ConfigError, match="attention_block"):
        ModelConfig(attention_block=0)
    with pytest.raises(ConfigError, match="attention_max_documents"):
        ModelConfig(attention_max_documents=1)


def test_chunked_attention_at_8192_tokens_needs_no_length_squared_memory():
    """Forward and backward at T = 8,192 (2 heads over 1 kv head): XLA's temporary buffers stay
    far below one head's [T, T] float32 scores (256 MiB); the dense path needs several."""
    length, heads, head_dim = 8192, 2, 16
    scores_per_head = length * length * 4

    def loss(q, k, v, segments, implementation):
        out = attend(q, k, v, segment_ids=segments, implementation=implementation, block=512)
        return jnp.sum(out * out)

    q = jax.ShapeDtypeStruct((1, length, heads, head_dim), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, length, 1, head_dim), jnp.float32)
    segments = jax.ShapeDtypeStruct((1, length), jnp.int32)
    step = jax.jit(jax.value_and_grad(loss, (0, 1, 2)), static_argnums=4)
    temp = {
        name: step.lower(q, kv, kv, segments, name).compile().memory_analysis().temp_size_in_bytes
        for name in ("chunked", "xla")
    }
    # Measured with jax 0.10 on XLA:CPU: chunked 10.9 MiB, xla 2,048 MiB.
    assert temp["chunked"] < scores_per_head / 8
    assert temp["xla"] >= heads * scores_per_head

    rng = np.random.default_rng(0)
    values = [jnp.asarray(rng.normal(size=s.shape), jnp.float32) for s in (q, kv, kv)]
    ids = jnp.asarray(np.repeat([1, 2, 3, 0], [3000, 2500, 2500, 192])[None], jnp.int32)
    value, grads = step(*values, ids, "chunked")
    assert np.isfinite(float(value))
    assert all(bool(jnp.isfinite(g).all()) for g in grads)
