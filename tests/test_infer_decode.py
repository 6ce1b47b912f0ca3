"""KV-cache decoding is the full forward pass, step by step, with and without memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hmem_jax.bank.geometry import BankGeometry
from hmem_jax.config import HierarchyConfig, MemoryConfig, ModelConfig
from hmem_jax.infer.decode import Decoder, Sampling, left_pad, sample_tokens
from hmem_jax.model import Transformer
from hmem_jax.model import memory as memory_lib
from hmem_jax.model.cache import init_cache

CFG = ModelConfig(
    vocab_size=61, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=48
)
PROMPTS = [[5, 9, 11, 2, 7], [3], [8, 8, 1]]


def _params(cfg=CFG):
    ids = jnp.zeros((1, 4), jnp.int32)
    return Transformer(cfg).init(jax.random.key(0), ids, ids + 1, ids)["params"]


def _memory(kind="ffn", batch=3):
    """Per-sequence memory [layers, B, ...] with random (non-zero) blocks for each row."""
    geometry = BankGeometry.from_configs(
        CFG, MemoryConfig(kind=kind, level_sizes=(4, 2)), HierarchyConfig(branching=4, depth=2)
    )
    fetched = {}
    for level in geometry.active_levels:
        fetched[level] = {
            name: 0.3
            * jax.random.normal(
                jax.random.key(10 * level + i), (batch,) + geometry.block_shape(name, level)
            )
            for i, name in enumerate(sorted(geometry.matrices))
        }
    slots = {level: jnp.arange(batch) for level in geometry.active_levels}
    rank_axes = {n: m.rank_axis for n, m in geometry.matrices.items()}
    return memory_lib.sequence_memory(fetched, slots, rank_axes)


def _full_logits_batch(model, params, sequences, memory):
    """Logits[B, T, V] of unpadded sequences, right-padded (padding is its own segment)."""
    width = max(len(s) for s in sequences)
    tokens = np.zeros((len(sequences), width), np.int32)
    segments = np.zeros_like(tokens)
    for row, ids in enumerate(sequences):
        tokens[row, : len(ids)], segments[row, : len(ids)] = ids, 1
    positions = np.broadcast_to(np.arange(width), tokens.shape)
    return model.apply({"params": params}, tokens, segments, positions, memory)


@pytest.mark.parametrize("kind", [None, "ffn", "lora_qk", "kv"])
def test_cached_logits_equal_full_recomputation_at_every_step(kind):
    """Greedy-decode with the cache, then run each final sequence through the training forward
    pass: by causality its logits at position t are the full recomputation of prefix t."""
    params = _params()
    model = Transformer(CFG, lora_scale=0.5)
    memory = None if kind is None else _memory(kind)
    extend = jax.jit(
        lambda *args: model.apply({"params": params}, *args, method=Transformer.extend)
    )
    batch = left_pad(PROMPTS, pad_id=0)
    steps = 4
    cache = init_cache(CFG, len(PROMPTS), batch["tokens"].shape[1] + steps)
    logits, cache = extend(batch["tokens"], batch["segment_ids"], batch["positions"], cache, memory)
    sequences = [list(p) for p in PROMPTS]
    cached = [[logits[row, -len(p) :]] for row, p in enumerate(PROMPTS)]
    for _ in range(steps):
        token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        positions = jnp.asarray([[len(s)] for s in sequences], jnp.int32)
        for row, ids in enumerate(sequences):
            ids.append(int(token[row]))
        logits, cache = extend(token[:, None], jnp.ones_like(positions), positions, cache, memory)
        for row in range(len(PROMPTS)):
            cached[row].append(logits[row, -1:])
    full = _full_logits_batch(model, params, sequences, memory)
    for row, ids in enumerate(sequences):
        np.testing.assert_allclose(
            jnp.concatenate(cached[row])[: len(ids) - 1],
            full[row, : len(ids) - 1],
            atol=2e-5,
            rtol=1e-5,
        )


@pytest.mark.parametrize("with_memory", [False, True])
def test_greedy_generate_equals_argmax_of_full_recomputation(with_memory):
    params = _params()
    memory = _memory() if with_memory else None
    out = Decoder(Transformer(CFG), params).generate(PROMPTS, Sampling(max_new_tokens=5), memory)
    sequences = [prompt + out[row] for row, prompt in enumerate(PROMPTS)]
    full = jnp.argmax(_full_logits_batch(Transformer(CFG), params, sequences, memory), axis=-1)
    for row, prompt in enumerate(PROMPTS):
        # Each generated token is the argmax of the full pass over everything before it.
        assert out[row] == [int(t) for t in full[row, len(prompt) - 1 : len(sequences[row]) - 1]]


def test_generation_stops_at_a_stop_id():
    params = _params()
    greedy = Decoder(Transformer(CFG), params).generate(PROMPTS, Sampling(max_new_tokens=6))
    stop = greedy[0][2]
    cut = Decoder(Transformer(CFG), params).generate(
        PROMPTS, Sampling(max_new_tokens=6, stop_ids=(stop,))
    )
    assert cut[0] == greedy[0][: greedy[0].index(stop)]


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = jax.random.normal(jax.random.key(3), (16, 61))
    greedy = jnp.argmax(logits, axis=-1)
    for top_k, top_p in ((1, 1.0), (0, 1e-6)):
        drawn = sample_tokens(logits, jax.random.key(4), 1.0, top_k, top_p)
        np.testing.assert_array_equal(drawn, greedy)


def test_sampling_is_deterministic_per_seed_and_respects_top_k():
    logits = jax.random.normal(jax.random.key(5), (256, 61))
    a = sample_tokens(logits, jax.random.key(6), 0.8, 3, 1.0)
    b = sample_tokens(logits, jax.random.key(6), 0.8, 3, 1.0)
    np.testing.assert_array_equal(a, b)
    top3 = jax.lax.top_k(logits, 3)[1]
    assert bool(jnp.all(jnp.any(top3 == a[:, None], axis=-1)))
