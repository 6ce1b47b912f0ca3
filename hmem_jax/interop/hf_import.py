"""Import a local `transformers` checkpoint (Llama-, Qwen3- or hmem-exported) as an hmem_jax anchor.

The paper adds post-hoc memories to open models with frozen anchors (docs/method.md
§3). An imported anchor is written as an ordinary hmem_jax run folder (a
step-0 orbax checkpoint holding only the parameters, `config.gin`, and
`model.gin` with the ModelConfig bindings), so a post-hoc memory run starts
from it exactly like a frozen-anchor run from an hmem_jax anchor:
`TrainConfig.init_from = '<that folder>'` (see experiments/posthoc_ffn.gin).

Supported: model_type 'llama' / 'mistral' (no qk-norm; no sliding window),
'qwen2' (q/k/v biases), 'qwen3' (per-head qk-norm) and 'hmem' (our export with full-width qk-norm),
with SiLU SwiGLU, no biases, default or Llama-3-scaled RoPE. Anything else is refused with
the reason (e.g. Gemma's (1 + w) norms and embedding
scaling, YaRN or dynamic RoPE), never imported approximately.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import numpy as np

from hmem_jax.config import ModelConfig
from hmem_jax.errors import MissingPathError, UnsupportedCheckpointError
from hmem_jax.interop.hf_layout import from_hf_tensors

QK_NORM_OF = {
    "llama": "none",
    "mistral": "none",
    "qwen2": "none",
    "qwen3": "per_head",
    "hmem": "full",
}

# The config.json fields an anchor cannot be built without.
REQUIRED_FIELDS = (
    "vocab_size",
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "intermediate_size",
)


def read_hf_config(path: str) -> dict[str, Any]:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise MissingPathError(
            f"{path!r} has no config.json; give a local transformers "
            "checkpoint folder (save_pretrained output)."
        )
    with open(config_path, encoding="utf-8") as handle:
        try:
            config = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise UnsupportedCheckpointError(
                f"{config_path} is not JSON ({error}); give a transformers checkpoint folder "
                "whose config.json save_pretrained wrote."
            ) from None
    if not isinstance(config, dict):
        raise UnsupportedCheckpointError(f"{config_path} holds no JSON object of settings.")
    return config


def _rope(config: dict[str, Any]) -> tuple[float, tuple[float, ...]]:
    """(rope base, Llama 3 rescaling or ()) from either generation of transformers configs."""
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    params = {**scaling, **rope}
    kind = params.get("rope_type", params.get("type", "default"))
    base = float(params.get("rope_theta", config.get("rope_theta", 10_000.0)))
    if kind in ("default", None):
        return base, ()
    if kind == "llama3":
        return base, (
            float(params["factor"]),
            float(params["low_freq_factor"]),
            float(params["high_freq_factor"]),
            float(params["original_max_position_embeddings"]),
        )
    raise UnsupportedCheckpointError(
        f"RoPE type {kind!r} is not implemented by hmem_jax's anchor; only 'default' and 'llama3'."
    )


def model_config_from_hf(config: dict[str, Any], **overrides: Any) -> ModelConfig:
    """The ModelConfig that reproduces a transformers config exactly, or an error saying why not."""
    model_type = config.get("model_type")
    if model_type not in QK_NORM_OF:
        raise UnsupportedCheckpointError(
            f"model_type {model_type!r} is not supported; hmem_jax imports "
            f"{sorted(QK_NORM_OF)} (pre-norm, gain-only RMSNorm, SwiGLU, no biases)."
        )
    missing = [key for key in REQUIRED_FIELDS if config.get(key) is None]
    if missing:
        raise UnsupportedCheckpointError(
            f"The {model_type} config.json lacks {missing}; give the checkpoint folder "
            "save_pretrained wrote, with its complete config.json."
        )
    problems = []
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config.get('hidden_act')!r} (we use SiLU-gated SwiGLU)")
    qkv_bias = model_type == "qwen2"  # Qwen2 always has q/k/v biases (and none on o)
    if config.get("attention_bias") or config.get("mlp_bias"):
        problems.append("attention or MLP biases (our anchor has q/k/v biases only for Qwen2)")
    if config.get("use_sliding_window") or (
        model_type == "mistral" and config.get("sliding_window")
    ):
        problems.append("sliding-window attention")
    if problems:
        raise UnsupportedCheckpointError(
            f"Cannot import this {model_type} checkpoint exactly: " + "; ".join(problems) + "."
        )
    rope_base, rope_llama3 = _rope(config)
    heads = int(config["num_attention_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    values = dict(
        vocab_size=int(config["vocab_size"]),
        num_layers=int(config["num_hidden_layers"]),
        d_model=int(config["hidden_size"]),
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        d_ff=int(config["intermediate_size"]),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        rope_base=rope_base,
        rope_llama3=rope_llama3,
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        qk_norm=QK_NORM_OF[model_type],
        qkv_bias=qkv_bias,
        param_dtype="float32",
        dtype="float32",
        init_std=float(config.get("initializer_range", 0.02)),
    )
    values.update(overrides)
    return ModelConfig(**values)


def read_hf_tensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint's safetensors files as float32 numpy (bf16 via torch)."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise MissingPathError(
            f"{path!r} holds no *.safetensors file (save the model with safe_serialization=True)."
        )
    tensors = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name).float().numpy()
    return tensors


def load_hf_anchor(path: str) -> tuple[ModelConfig, dict[str, Any]]:
    """(ModelConfig, parameter tree) of a local transformers checkpoint."""
    cfg = model_config_from_hf(read_hf_config(path))
    return cfg, from_hf_tensors(read_hf_tensors(path), cfg)


def model_gin(cfg: ModelConfig) -> str:
    """Gin bindings that rebuild `cfg` (and size the data's vocabulary to the model's)."""
    lines = ["# The imported anchor's architecture (written by hmem_jax.main.import_hf)."]
    for field, value in vars(cfg).items():
        lines.append(f"ModelConfig.{field} = {value!r}")
    lines.append(f"DataConfig.vocab_size = {cfg.vocab_size}")
    return "\n".join(lines) + "\n"


def write_anchor_run(
    workdir: str, cfg: ModelConfig, params: dict[str, Any], source: str = ""
) -> str:
    """Write `params` as a step-0 hmem_jax checkpoint in `workdir` (init_from-ready)."""
    import jax.numpy as jnp

    from hmem_jax.train.checkpoint import Checkpointer
    from hmem_jax.train.state import TrainState

    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    gin_text = model_gin(cfg)
    for name in ("model.gin", "config.gin"):
        with open(os.path.join(workdir, name), "w", encoding="utf-8") as handle:
            handle.write(gin_text)
    state = TrainState(
        step=jnp.zeros((), jnp.int32), params=jax_tree(params), opt_state={}, bank=None
    )
    checkpointer = Checkpointer(
        os.path.join(workdir, "checkpoints"), every=1, keep=1, async_save=False
    )
    try:
        checkpointer.save(
            0, state, {"imported_from": os.path.abspath(source) if source else ""}, force=True
        )
    finally:
        checkpointer.close()
    return workdir


def jax_tree(params: dict[str, Any]) -> Any:
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
