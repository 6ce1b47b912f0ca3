"""Export an anchor, or anchor + one path's memory, as a `transformers` checkpoint; export a bank.

An FFN-memory block is extra SwiGLU hidden units (docs/method.md), so anchor +
one fetched path is a standard model whose FFN is R = Σ r_l units wider: the
path's gate/up columns and down rows are appended to every layer's FFN
(layers without memory get zero units, which add exactly nothing). LoRA
memories merge into the projections they adapt (W + scale·A·B). KV-memories
have no standard equivalent and are refused.

The folder holds config.json, model.safetensors, the tokenizer files,
`hmem_export.json` (what was exported: run, step, path, memory mode) and, for
full-width qk-norm, `modeling_hmem.py` (load with trust_remote_code=True).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import numpy as np

from hmem_jax import paths
from hmem_jax.config import ModelConfig
from hmem_jax.errors import UnsupportedExportError
from hmem_jax.interop import hf_layout

_LORA_TARGETS = {
    "q": ("attn", "wq"),
    "k": ("attn", "wk"),
    "v": ("attn", "wv"),
    "o": ("attn", "wo"),
    "gate": ("mlp", "w_gate"),
    "up": ("mlp", "w_up"),
    "down": ("mlp", "w_down"),
}


def _numpy_tree(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _numpy_tree(v) for k, v in tree.items()}
    return np.asarray(tree, np.float32)


def merge_memory(
    params: Mapping[str, Any], memory: Mapping[str, Any] | None, lora_scale: float = 1.0
) -> tuple[dict[str, Any], int]:
    """(params with one sequence's memory merged in, extra FFN units R).

    `memory` is the model's memory input for ONE sequence (leaves
    [layers, 1, ...], e.g. from `retrieval.build_memory`), or None.
    """
    merged = _numpy_tree(nn.meta.unbox(params))
    if not memory:
        return merged, 0
    memory = {k: np.asarray(v, np.float32)[:, 0] for k, v in memory.items()}
    if "keys" in memory:
        raise UnsupportedExportError(
            "KV-memories have no equivalent in a standard transformers model; "
            "export the anchor alone (memory mode 'none')."
        )
    mlp = merged["blocks"]["mlp"]
    extra = 0
    if "down" in memory and "gate" in memory:
        extra = memory["gate"].shape[-1]
        mlp["w_gate"] = np.concatenate([mlp["w_gate"], memory["gate"]], axis=-1)
        mlp["w_up"] = np.concatenate([mlp["w_up"], memory["up"]], axis=-1)
        mlp["w_down"] = np.concatenate([mlp["w_down"], memory["down"]], axis=-2)
    for name, (module, weight) in _LORA_TARGETS.items():
        if f"{name}_a" in memory:
            delta = lora_scale * np.einsum("lir,lro->lio", memory[f"{name}_a"], memory[f"{name}_b"])
            merged["blocks"][module][weight] = merged["blocks"][module][weight] + delta
    return merged, extra


def write_tokenizer(prepared_dir: str, out_dir: str) -> tuple[list[str], dict[str, int]]:
    """Copy the run's tokenizer with a `tokenizer_config.json` naming its class and special
    tokens; returns (files written, special token ids for config.json/generation_config.json).

    A `tokenizers` JSON loads as PreTrainedTokenizerFast; a sentencepiece model
    as LlamaTokenizer without added BOS/EOS, which encodes text as our
    tokenizer does (except that leading whitespace of a text is dropped).
    Naming the class keeps AutoTokenizer from looking for remote code.
    """
    from hmem_jax.data.tokenizer import load_tokenizer

    if not paths.isfile(paths.join(prepared_dir, "manifest.json")):
        return [], {}
    tokenizer = load_tokenizer(prepared_dir)
    path = tokenizer.save(out_dir)
    ids = {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eot_id,
        "pad_token_id": tokenizer.pad_id,
    }
    config: dict[str, Any] = {
        "bos_token": tokenizer.piece(tokenizer.bos_id),
        "eos_token": tokenizer.piece(tokenizer.eot_id),
        "pad_token": tokenizer.piece(tokenizer.pad_id),
        "model_max_length": 1 << 20,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    if tokenizer.kind == "hf":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    else:
        config.update(tokenizer_class="LlamaTokenizer", legacy=False, add_prefix_space=None)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as handle:
        json.dump(config, handle, indent=1)
    return [os.path.basename(path), "tokenizer_config.json"], ids


def export_hf(
    out_dir: str,
    cfg: ModelConfig,
    params: Mapping[str, Any],
    memory: Mapping[str, Any] | None = None,
    lora_scale: float = 1.0,
    prepared_dir: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """Write a transformers checkpoint of the anchor (+ one sequence's merged memory)."""
    from safetensors.numpy import save_file

    merged, extra = merge_memory(params, memory, lora_scale)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer_files, special_ids = (
        write_tokenizer(prepared_dir, out_dir) if prepared_dir else ([], {})
    )
    config = {**hf_layout.hf_config(cfg, intermediate_size=cfg.d_ff + extra), **special_ids}
    with open(os.path.join(out_dir, "config.json"), "w") as handle:
        json.dump(config, handle, indent=1)
    if special_ids:  # generate() stops at the end-of-text token, as `hmem generate` does
        with open(os.path.join(out_dir, "generation_config.json"), "w") as handle:
            json.dump(special_ids, handle, indent=1)
        tokenizer_files.append("generation_config.json")
    if cfg.qk_norm == "full":
        shutil.copy(
            os.path.join(os.path.dirname(__file__), hf_layout.REMOTE_CODE_FILE),
            os.path.join(out_dir, hf_layout.REMOTE_CODE_FILE),
        )
    save_file(
        hf_layout.to_hf_tensors(merged, cfg),
        os.path.join(out_dir, "model.safetensors"),
        metadata={"format": "pt"},
    )
    record = {
        "architecture": config["architectures"][0],
        "extra_ffn_units": extra,
        "trust_remote_code": cfg.qk_norm == "full",
        "tokenizer_files": tokenizer_files,
        **(metadata or {}),
    }
    with open(os.path.join(out_dir, "hmem_export.json"), "w") as handle:
        json.dump(record, handle, indent=1, default=str)
    return out_dir


def export_bank(
    out_dir: str,
    bank: Mapping[str, Any],
    geometry_description: Mapping[str, Any],
    tree_dir: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> str:
    """The bank's blocks as one safetensors file per level ([clusters, layers, ...] per matrix)
    plus `manifest.json`: geometry, files, tensor shapes, how ids follow from a path, the tree."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    files = {}
    for key, level in sorted(bank.items()):
        tensors = {
            name: np.ascontiguousarray(np.asarray(value)) for name, value in level.params.items()
        }
        path = f"bank_{key}.safetensors"
        save_file(tensors, os.path.join(out_dir, path))
        files[key] = {
            "file": path,
            "tensors": {n: list(t.shape) for n, t in tensors.items()},
            "dtype": str(next(iter(tensors.values())).dtype),
            "updates": np.asarray(level.count).tolist(),
        }
    if tree_dir:
        paths.copy_folder(tree_dir, os.path.join(out_dir, "tree"))  # a gs:// or s3:// tree too
    manifest = {
        "format": "hmem_jax bank v1",
        "geometry": dict(geometry_description),
        "levels": files,
        "block_id": "level l (1-based) block of path (i1..iL) = ((i1*b + i2)*b + ...)*b + i_l",
        "merge": "FFN: concatenate a path's gate/up along the last axis and down along the rank "
        "axis to each layer's SwiGLU (see hmem_jax/interop/hf_export.py)",
        "tree": "tree/" if tree_dir else None,
        **(metadata or {}),
    }
    with open(os.path.join(out_dir, "manifest.json"), "w") as handle:
        json.dump(manifest, handle, indent=1, default=str)
    return out_dir
