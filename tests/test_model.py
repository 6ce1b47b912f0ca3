"""The anchor: exact paper parameter counts, masking, RoPE, GQA, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hmem_jax.config import ConfigError, ModelConfig, model_preset
from hmem_jax.model import Transformer, count_params, init_abstract
from hmem_jax.model.attention import document_causal_mask
from hmem_jax.model.layers import rotary

TINY = ModelConfig(vocab_size=97, num_layers=2, d_model=32, num_heads=4, head_dim=8, d_ff=64)


@pytest.mark.parametrize(
    "name, expected", [("160m", 163_510_016), ("410m", 411_665_408), ("1p4b", 1_439_893_504)]
)
def test_paper_presets_have_the_papers_exact_parameter_counts(name, expected):
    assert count_params(init_abstract(model_preset(name))) == expected


def _init(cfg, length=12, batch=2, seed=0):
    model = Transformer(cfg)
    ids = jnp.zeros((batch, length), jnp.int32)
    return model, model.init(jax.random.key(seed), ids, ids + 1, ids)["params"]


def _apply(model, params, tokens, segment_ids, positions):
    return np.asarray(
        model.apply(
            {"params": params},
            jnp.asarray(tokens),
            jnp.asarray(segment_ids),
            jnp.asarray(positions),
        )
    )


def test_packed_documents_equal_each_document_run_alone():
    model, params = _init(TINY)
    rng = np.random.default_rng(0)
    doc_a, doc_b = rng.integers(0, 97, 7), rng.integers(0, 97, 5)
    packed = np.concatenate([doc_a, doc_b])[None]
    segments = np.array([[1] * 7 + [2] * 5])
    positions = np.concatenate([np.arange(7), np.arange(5)])[None]
    logits = _apply(model, params, packed, segments, positions)
    alone_a = _apply(model, params, doc_a[None], np.ones((1, 7)), np.arange(7)[None])
    alone_b = _apply(model, params, doc_b[None], np.ones((1, 5)), np.arange(5)[None])
    np.testing.assert_allclose(logits[0, :7], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(logits[0, 7:], alone_b[0], atol=1e-5)


def test_changing_another_document_or_a_future_token_leaves_logits_unchanged():
    model, params = _init(TINY)
    tokens = np.arange(12)[None] % 97
    segments = np.array([[1] * 6 + [2] * 6])
    positions = np.concatenate([np.arange(6), np.arange(6)])[None]
    base = _apply(model, params, tokens, segments, positions)
    changed = tokens.copy()
    changed[0, 9] = 50  # future token of document 2
    changed[0, 2] = 60  # token of document 1
    out = _apply(model, params, changed, segments, positions)
    np.testing.assert_allclose(out[0, 6:9], base[0, 6:9], atol=1e-6)
    assert not np.allclose(out[0, 9], base[0, 9])


def test_document_mask_matches_a_per_document_reference():
    segments = jnp.array([[1, 1, 2, 2, 2, 0]])
    mask = np.asarray(document_causal_mask(segments))[0, 0]
    for q in range(6):
        for k in range(6):
            assert mask[q, k] == (k <= q and int(segments[0, q]) == int(segments[0, k]))


def test_rotary_is_a_relative_encoding():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32)

    def score(pq, pk):
        rq = rotary(q, jnp.array([[pq]]), 100_000.0)
        rk = rotary(k, jnp.array([[pk]]), 100_000.0)
        return float(jnp.sum(rq * rk))

    assert score(3, 1) == pytest.approx(score(12, 10), abs=1e-5)
    assert score(3, 1) != pytest.approx(score(3, 2), abs=1e-3)


def test_grouped_query_attention_equals_repeated_kv_heads():
    gqa = ModelConfig(**{**TINY.__dict__, "num_kv_heads": 2})
    model, params = _init(gqa)
    assert params["blocks"]["attn"]["wk"].value.shape == (2, 32, 16)
    # Repeat each kv head into an MHA model: wk columns [h0, h1] -> [h0, h0, h1, h1].
    mha = Transformer(TINY)
    full = jax.tree.map(lambda x: x, params)
    for name in ("wk", "wv"):
        w = np.asarray(params["blocks"]["attn"][name].value).reshape(2, 32, 2, 8)
        full["blocks"]["attn"][name] = params["blocks"]["attn"][name].replace_boxed(
            jnp.asarray(np.repeat(w, 2, axis=2).reshape(2, 32, 32))
        )
    for norm in ("k_norm",):
        g = np.asarray(params["blocks"]["attn"][norm]["scale"].value).reshape(2, 2, 8)
        full["blocks"]["attn"][norm]["scale"] = params["blocks"]["attn"][norm][
            "scale"
        ].replace_boxed(jnp.asarray(np.repeat(g, 2, axis=1).reshape(2, 32)))
    tokens = np.arange(10)[None] % 97
    ones = np.ones((1, 10))
    pos = np.arange(10)[None]
    # Repeating kv heads keeps the key vector's mean square, so full-width k-norm agrees too.
    np.testing.assert_allclose(
        _apply(model, params, tokens, ones, pos), _apply(mha, full, tokens, ones, pos), atol=1e-5
    )


def test_untied_model_has_a_separate_head_and_per_head_qk_norm_has_head_dim_gains():
    cfg = ModelConfig(**{**TINY.__dict__, "tie_embeddings": False, "qk_norm": "per_head"})
    _, params = _init(cfg)
    assert params["lm_head"].value.shape == (32, 97)
    assert params["blocks"]["attn"]["q_norm"]["scale"].value.shape == (2, 8)


def test_bfloat16_parameters_and_compute_give_float32_logits_close_to_float32():
    model32, params = _init(TINY)
    bf16 = ModelConfig(**{**TINY.__dict__, "param_dtype": "bfloat16", "dtype": "bfloat16"})
    model16 = Transformer(bf16)
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    tokens = np.arange(12)[None] % 97
    ones, pos = np.ones((1, 12)), np.arange(12)[None]
    out16 = model16.apply({"params": params16}, tokens, ones, pos)
    assert out16.dtype == jnp.float32
    out32 = np.asarray(_apply(model32, params, tokens, ones, pos))
    # bf16 keeps 8 bits of mantissa: here the logits move by ~3% of their spread (0.0039 of
    # std 0.117); allow 5%, far below what a float32 step lost in bf16 would cost.
    np.testing.assert_allclose(np.asarray(out16), out32, rtol=0, atol=0.05 * out32.std())


def test_remat_does_not_change_the_gradient():
    model, params = _init(TINY)
    remat = Transformer(ModelConfig(**{**TINY.__dict__, "remat": "full"}))
    tokens = jnp.arange(12)[None] % 97
    ones, pos = jnp.ones((1, 12), jnp.int32), jnp.arange(12)[None]

    def loss(m, p):
        return jnp.mean(m.apply({"params": p}, tokens, ones, pos) ** 2)

    g1 = jax.grad(lambda p: loss(model, p))(params)
    g2 = jax.grad(lambda p: loss(remat, p))(params)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("num_kv_heads", 3, "must divide"),
        ("head_dim", 7, "even"),
        ("qk_norm", "l2", "qk_norm"),
        ("dtype", "int8", "dtype"),
        ("d_model", 0, "d_model"),
    ],
)
def test_bad_model_values_are_clear_errors(field, value, fragment):
    with pytest.raises(ConfigError, match=fragment):
        ModelConfig(**{**TINY.__dict__, field: value})
