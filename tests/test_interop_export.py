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

BASE = dict(
    vocab_size=97,
    num_layers=2,
    d_model=32,
    num_heads=4,
    num_kv_heads=2,
    head_dim=12,
    d_ff=40,
    rope_base=10_000.0,
)


def random_params(cfg, seed=0):
    """Initialised parameters with every leaf perturbed (norm gains too), so no mapping hides."""
    ids = jnp.zeros((1, 4), jnp.int32)
    params = Transformer(cfg).init(jax.random.key(seed), ids, ids + 1, ids)["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(
        tree, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )


def one_path_memory(cfg, kind="ffn"):
    geometry = BankGeometry.from_configs(
        cfg, MemoryConfig(kind=kind, level_sizes=(6, 3)), HierarchyConfig(branching=4, depth=2)
    )
    fetched = {
        level: {
            name: 0.3
            * jax.random.normal(
                jax.random.key(7 * level + i), (1,) + geometry.block_shape(name, level)
            )
            for i, name in enumerate(sorted(geometry.matrices))
        }
        for level in geometry.active_levels
    }
    slots = {level: jnp.zeros((1,), jnp.int32) for level in geometry.active_levels}
    rank_axes = {n: m.rank_axis for n, m in geometry.matrices.items()}
    return memory_lib.sequence_memory(fetched, slots, rank_axes)


def hf_logits(path, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, trust_remote_code=True, dtype=torch.float32
    )
    model.eval()
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.numpy()


def ours(cfg, params, tokens, memory=None, lora_scale=1.0):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return np.asarray(
        Transformer(cfg, lora_scale=lora_scale).apply(
            {"params": params}, tokens, jnp.ones_like(tokens), positions, memory
        )
    )


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
    config = transformers.AutoConfig.from_pretrained(
        str(tmp_path), local_files_only=True, trust_remote_code=True
    )
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
    from hmem_jax.data.tokenizer import train_hf_bpe

    texts = ["The atomic number of Brium is 42.", "Hugo was born in the year 1874."] * 50
    tokenizer = train_hf_bpe(texts, 300)
    prepared = _prepared_with(tokenizer, tmp_path / "prepared")
    cfg = ModelConfig(**{**BASE, "vocab_size": 300})
    export_hf(str(tmp_path / "hf"), cfg, random_params(cfg), prepared_dir=prepared)
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    for text in texts[:2]:
        assert loaded.encode(text, add_special_tokens=False) == tokenizer.encode(text)
    assert loaded.eos_token_id == tokenizer.eot_id and loaded.pad_token_id == tokenizer.pad_id


def _prepared_with(tokenizer, folder):
    import json

    folder.mkdir()
    tokenizer.save(str(folder))
    (folder / "manifest.json").write_text(json.dumps({"tokenizer": tokenizer.describe()}))
    return str(folder)


def test_a_sentencepiece_tokenizer_loads_without_remote_code_and_encodes_like_ours(tmp_path):
    from hmem_jax.data.tokenizer import train_sentencepiece

    texts = [
        "The atomic number of Brium is 42.",
        "Hugo was born in the year 1874.",
        "Zhouium \u00fc  two  spaces\nand a new line",
    ] * 40
    tokenizer = train_sentencepiece(texts, 300)
    prepared = _prepared_with(tokenizer, tmp_path / "prepared")
    cfg = ModelConfig(**{**BASE, "vocab_size": 300})  # qk_norm 'full': the model needs remote code
    export_hf(str(tmp_path / "hf"), cfg, random_params(cfg), prepared_dir=prepared)
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    for text in texts[:3]:
        assert loaded.encode(text, add_special_tokens=False) == tokenizer.encode(text)
    assert loaded.eos_token_id == tokenizer.eot_id == 3


def _always_end_of_text(cfg, params, eot_id):
    """Parameters whose next token is always `eot_id`: blocks zeroed (the residual stream is the
    token embedding), embedding dimension 0 positive, final norm reading only that dimension,
    and a head whose only non-zero row is the end-of-text token's."""
    import flax.linen as nn

    params = jax.tree.map(np.asarray, nn.unbox(params))
    blocks = jax.tree.map(
        lambda x: np.ones_like(x) if x.ndim == 2 else np.zeros_like(x), params["blocks"]
    )
    embedding = params["embedding"].copy()
    embedding[:, 0] = np.abs(embedding[:, 0]) + 1.0
    scale = np.zeros_like(params["final_norm"]["scale"])
    scale[0] = 1.0
    head = np.zeros_like(params["lm_head"])
    head[0, eot_id] = 10.0
    return {
        **params,
        "blocks": blocks,
        "embedding": embedding,
        "final_norm": {"scale": scale},
        "lm_head": head,
    }


def test_exported_generate_stops_at_end_of_text_as_hmem_generate_does(tmp_path):
    from hmem_jax.data.tokenizer import train_hf_bpe
    from hmem_jax.infer.decode import Decoder, Sampling

    tokenizer = train_hf_bpe(["The atomic number of Brium is 42."] * 50, 300)
    prepared = _prepared_with(tokenizer, tmp_path / "prepared")
    cfg = ModelConfig(**{**BASE, "vocab_size": 300, "qk_norm": "none", "tie_embeddings": False})
    params = _always_end_of_text(cfg, random_params(cfg), tokenizer.eot_id)
    prompt = tokenizer.encode("The atomic number of")
    ours_out = Decoder(Transformer(cfg), params).generate(
        [prompt],
        Sampling(max_new_tokens=6, stop_ids=(tokenizer.eot_id,)),
        None,
        pad_id=tokenizer.pad_id,
    )[0]
    assert list(ours_out) == []  # the first token is end-of-text: nothing before the stop
    export_hf(str(tmp_path / "hf"), cfg, params, prepared_dir=prepared)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "hf"), local_files_only=True
    )
    assert model.generation_config.eos_token_id == tokenizer.eot_id
    out = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)
    assert out[0, len(prompt) :].tolist() == [tokenizer.eot_id]  # stopped there too
