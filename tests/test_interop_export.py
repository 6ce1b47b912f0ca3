"""Exported checkpoints load in `transformers` (offline) and give hmem_jax's logits."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="HF interop needs the 'hf' extra (torch)")
transformers = pytest.importorskip("transformers", reason="HF interop needs the 'hf' extra")
pytest.importorskip("safetensors", reason="HF interop needs the 'hf' extra (safetensors)")

from hmem_jax.bank.geometry import BankGeometry  # noqa: E402
from hmem_jax.config import HierarchyConfig, MemoryConfig, ModelConfig  # noqa: E402
from hmem_jax.interop.hf_export import export_hf  # noqa: E402
from hmem_jax.model import Transformer  # noqa: E402
from hmem_jax.model import memory as memory_lib  # noqa: E402

BASE = dict(vocab_size=97, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=12,
            d_ff=40, rope_base=10_000.0)


def random_params(cfg, seed=0):
    """Initialised parameters with every leaf perturbed (norm gains too), so no mapping hides."""
    ids = jnp.zeros((1, 4), jnp.int32)
    params = Transformer(cfg).init(jax.random.key(seed), ids, ids + 1, ids)["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.2 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])


def one_path_memory(cfg, kind="ffn"):
    geometry = BankGeometry.from_configs(cfg, MemoryConfig(kind=kind, level_sizes=(6, 3)),
                                         HierarchyConfig(branching=4, depth=2))
    fetched = {level: {name: 0.3 * jax.random.normal(jax.random.key(7 * level + i),
                                                     (1,) + geometry.block_shape(name, level))
                       for i, name in enumerate(sorted(geometry.matrices))}
               for level in geometry.active_levels}
    slots = {level: jnp.zeros((1,), jnp.int32) for level in geometry.active_levels}
    rank_axes = {n: m.rank_axis for n, m in geometry.matrices.items()}
    return memory_lib.sequence_memory(fetched, slots, rank_axes)


def hf_logits(path, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, trust_remote_code=True, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.numpy()


def ours(cfg, params, tokens, memory=None, lora_scale=1.0):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return np.asarray(Transformer(cfg, lora_scale=lora_scale).apply(
        {"params": params}, tokens, jnp.ones_like(tokens), positions, memory))


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 11)), jnp.int32)


@pytest.mark.parametrize("qk_norm, tie", [("full", True), ("per_head", False), ("none", True)])
def test_exported_anchor_gives_the_same_logits_in_transformers(tmp_path, qk_norm, tie):
    cfg = ModelConfig(**BASE, qk_norm=qk_norm, tie_embeddings=tie)
    params = random_params(cfg)
    export_hf(str(tmp_path), cfg, params)
    assert os.path.isfile(tmp_path / "modeling_hmem.py") == (qk_norm == "full")
    diff = np.abs(hf_logits(str(tmp_path), TOKENS) - ours(cfg, params, TOKENS)).max()
    assert diff <= 1e-4, diff


def test_anchor_with_llama3_rope_scaling_exports_as_llama(tmp_path):
    cfg = ModelConfig(**BASE, qk_norm="none", rope_llama3=(8.0, 1.0, 4.0, 64))
    params = random_params(cfg)
    export_hf(str(tmp_path), cfg, params)
    assert np.abs(hf_logits(str(tmp_path), TOKENS) - ours(cfg, params, TOKENS)).max() <= 1e-4


def test_anchor_with_qkv_biases_exports_as_qwen2(tmp_path):
    cfg = ModelConfig(**BASE, qk_norm="none", qkv_bias=True)
    params = random_params(cfg)
    export_hf(str(tmp_path), cfg, params)
    assert transformers.AutoConfig.from_pretrained(str(tmp_path)).model_type == "qwen2"
    assert np.abs(hf_logits(str(tmp_path), TOKENS) - ours(cfg, params, TOKENS)).max() <= 1e-4


@pytest.mark.parametrize("qk_norm", ["full", "per_head"])
def test_anchor_plus_one_path_exports_as_a_wider_ffn_with_the_same_logits(tmp_path, qk_norm):
    cfg = ModelConfig(**BASE, qk_norm=qk_norm)
    params = random_params(cfg)
    memory = one_path_memory(cfg)
    export_hf(str(tmp_path), cfg, params, memory)
    config = transformers.AutoConfig.from_pretrained(str(tmp_path), local_files_only=True,
                                                     trust_remote_code=True)
    assert config.intermediate_size == cfg.d_ff + 9
    batch_memory = jax.tree.map(lambda x: jnp.repeat(x, 2, axis=1), memory)
    expected = ours(cfg, params, TOKENS, batch_memory)
    assert np.abs(expected - ours(cfg, params, TOKENS)).max() > 1e-2  # the memory matters
    diff = np.abs(hf_logits(str(tmp_path), TOKENS) - expected).max()
    assert diff <= 1e-4, diff


def test_lora_memory_merges_into_the_projections(tmp_path):
    cfg = ModelConfig(**BASE, qk_norm="per_head")
    params = random_params(cfg)
    memory = one_path_memory(cfg, "lora_qk")
    export_hf(str(tmp_path), cfg, params, memory, lora_scale=0.25)
    batch_memory = jax.tree.map(lambda x: jnp.repeat(x, 2, axis=1), memory)
    expected = ours(cfg, params, TOKENS, batch_memory, lora_scale=0.25)
    assert np.abs(hf_logits(str(tmp_path), TOKENS) - expected).max() <= 1e-4


def test_a_tokenizers_json_is_exported_loadable_by_autotokenizer(tmp_path):
    import json

    from hmem_jax.data.tokenizer import train_hf_bpe

    texts = ["The atomic number of Brium is 42.", "Hugo was born in the year 1874."] * 50
    tokenizer = train_hf_bpe(texts, 300)
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    tokenizer.save(str(prepared))
    (prepared / "manifest.json").write_text(json.dumps({"tokenizer": {"file": "tokenizer.json"}}))
    cfg = ModelConfig(**{**BASE, "vocab_size": 300})
    export_hf(str(tmp_path / "hf"), cfg, random_params(cfg), prepared_dir=str(prepared))
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    for text in texts[:2]:
        assert loaded.encode(text, add_special_tokens=False) == tokenizer.encode(text)
