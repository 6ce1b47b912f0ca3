"""How an hmem_jax anchor maps onto a `transformers` checkpoint, both ways (docs/design.md).

Architecture by qk-norm: 'none' -> Llama (Qwen2 with q/k/v biases), 'per_head' -> Qwen3
(its q/k norms are per head, gain of width head_dim), 'full' -> Qwen3 with full-width q/k
norms (`modeling_hmem.py`, loaded with trust_remote_code). All three are
pre-norm decoders with gain-only RMSNorm (eps inside the rsqrt), rotate-half
RoPE, SwiGLU and no biases, so the mapping is a renaming plus transposes:
our projections are [in, out], torch Linear weights are [out, in]. Our
parameters are stacked over layers (leading axis) by the scan.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from hmem_jax.config import ModelConfig
from hmem_jax.errors import UnsupportedCheckpointError, UnsupportedExportError

ARCHITECTURES = {
    "none": ("llama", "LlamaForCausalLM"),
    "per_head": ("qwen3", "Qwen3ForCausalLM"),
    "full": ("hmem", "HmemForCausalLM"),
}
REMOTE_CODE_FILE = "modeling_hmem.py"

# (our path under params["blocks"], HF name under model.layers.{i}, transpose?)
LAYER_TENSORS = (
    (("attn_norm", "scale"), "input_layernorm.weight", False),
    (("mlp_norm", "scale"), "post_attention_layernorm.weight", False),
    (("attn", "wq"), "self_attn.q_proj.weight", True),
    (("attn", "wk"), "self_attn.k_proj.weight", True),
    (("attn", "wv"), "self_attn.v_proj.weight", True),
    (("attn", "wo"), "self_attn.o_proj.weight", True),
    (("attn", "bq"), "self_attn.q_proj.bias", False),
    (("attn", "bk"), "self_attn.k_proj.bias", False),
    (("attn", "bv"), "self_attn.v_proj.bias", False),
    (("attn", "q_norm", "scale"), "self_attn.q_norm.weight", False),
    (("attn", "k_norm", "scale"), "self_attn.k_norm.weight", False),
    (("mlp", "w_gate"), "mlp.gate_proj.weight", True),
    (("mlp", "w_up"), "mlp.up_proj.weight", True),
    (("mlp", "w_down"), "mlp.down_proj.weight", True),
)


def rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    if not cfg.rope_llama3:
        return {"rope_theta": cfg.rope_base, "rope_type": "default"}
    factor, low, high, original = cfg.rope_llama3
    return {
        "rope_theta": cfg.rope_base,
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": int(original),
    }


def hf_config(
    cfg: ModelConfig, intermediate_size: int | None = None, max_position_embeddings: int = 8192
) -> dict[str, Any]:
    """config.json for the closest `transformers` architecture (see the module docstring)."""
    model_type, architecture = ARCHITECTURES[cfg.qk_norm]
    if cfg.qkv_bias:
        if cfg.qk_norm != "none":
            raise UnsupportedExportError(
                "No transformers architecture has q/k/v biases together with "
                f"qk-norm {cfg.qk_norm!r}; cannot export this anchor exactly."
            )
        model_type, architecture = "qwen2", "Qwen2ForCausalLM"
    config: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": intermediate_size or cfg.d_ff,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "use_sliding_window": False,
        "rope_theta": cfg.rope_base,
        "rope_parameters": rope_parameters(cfg),
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "dtype": "float32",
        "torch_dtype": "float32",
    }
    if model_type == "hmem":
        config["auto_map"] = {
            "AutoConfig": "modeling_hmem.HmemConfig",
            "AutoModelForCausalLM": "modeling_hmem.HmemForCausalLM",
        }
    return config


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if key not in tree:
            return None
        tree = tree[key]
    return tree


def to_hf_tensors(params: Mapping[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """HF tensor name -> float32 array, from our (unboxed) parameter tree."""
    out = {
        "model.embed_tokens.weight": np.asarray(params["embedding"], np.float32),
        "model.norm.weight": np.asarray(params["final_norm"]["scale"], np.float32),
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = np.ascontiguousarray(np.asarray(params["lm_head"], np.float32).T)
    blocks = params["blocks"]
    for path, name, transpose in LAYER_TENSORS:
        stacked = _get(blocks, path)
        if stacked is None:
            continue
        stacked = np.asarray(stacked, np.float32)
        for layer in range(cfg.num_layers):
            value = stacked[layer].T if transpose else stacked[layer]
            out[f"model.layers.{layer}.{name}"] = np.ascontiguousarray(value)
    return out


def from_hf_tensors(tensors: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
    """Our parameter tree (float32 numpy) from HF tensors; missing tensors are an error."""

    def take(name: str) -> np.ndarray:
        if name not in tensors:
            raise UnsupportedCheckpointError(
                f"The checkpoint has no tensor {name!r}; it does not fit the "
                f"architecture of ModelConfig {cfg}."
            )
        return np.asarray(tensors[name], np.float32)

    params: dict[str, Any] = {
        "embedding": take("model.embed_tokens.weight"),
        "final_norm": {"scale": take("model.norm.weight")},
        "blocks": {},
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = take("lm_head.weight").T
    for path, name, transpose in LAYER_TENSORS:
        if path[-2:] in (("q_norm", "scale"), ("k_norm", "scale")) and cfg.qk_norm == "none":
            continue
        if path[-1] in ("bq", "bk", "bv") and not cfg.qkv_bias:
            continue
        layers = [take(f"model.layers.{i}.{name}") for i in range(cfg.num_layers)]
        stacked = np.stack([x.T if transpose else x for x in layers])
        node = params["blocks"]
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = stacked
    return params
