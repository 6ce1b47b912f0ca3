"""Importing local transformers checkpoints as anchors, and post-hoc memories on them."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="HF interop needs the 'hf' extra (torch)")
transformers = pytest.importorskip("transformers", reason="HF interop needs the 'hf' extra")
pytest.importorskip("safetensors", reason="HF interop needs the 'hf' extra (safetensors)")

from hmem_jax.interop.hf_import import (  # noqa: E402
    UnsupportedCheckpointError,
    load_hf_anchor,
    model_config_from_hf,
    write_anchor_run,
)
from hmem_jax.model import Transformer  # noqa: E402

COMMON = dict(
    vocab_size=512,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=12,
    rms_norm_eps=1e-6,
    max_position_embeddings=256,
)


def save_tiny(path, model_type, seed=0, **extra):
    """A randomly initialised transformers model built from a dict config, saved locally."""
    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(model_type, **{**COMMON, **extra})
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norm gains away from 1 (biases from 0) so a mis-mapping shows
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.3 * torch.randn_like(param))
    model.save_pretrained(path)
    return model.eval()


TOKENS = np.random.default_rng(0).integers(0, 512, (2, 13)).astype(np.int32)


def ours(cfg, params, tokens=TOKENS):
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    return np.asarray(
        Transformer(cfg).apply(
            {"params": jax.tree.map(jnp.asarray, params)}, tokens, np.ones_like(tokens), positions
        )
    )


@pytest.mark.parametrize(
    "model_type, extra",
    [
        ("llama", dict(tie_word_embeddings=False)),
        ("qwen3", dict(tie_word_embeddings=True)),
        ("qwen3", dict(tie_word_embeddings=False, rope_theta=50_000.0)),
        ("qwen2", dict(tie_word_embeddings=True)),
        (
            "llama",
            dict(
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                }
            ),
        ),
    ],
)
def test_imported_anchor_gives_the_same_logits_as_transformers(tmp_path, model_type, extra):
    model = save_tiny(str(tmp_path), model_type, **extra)
    cfg, params = load_hf_anchor(str(tmp_path))
    with torch.no_grad():
        expected = model(torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()
    assert np.abs(ours(cfg, params) - expected).max() <= 1e-4


def test_checkpoints_we_cannot_reproduce_exactly_are_refused():
    base = {**COMMON, "model_type": "llama"}
    with pytest.raises(UnsupportedCheckpointError, match="biases"):
        model_config_from_hf({**base, "attention_bias": True})
    with pytest.raises(UnsupportedCheckpointError, match="RoPE type 'yarn'"):
        model_config_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 8.0}})
    with pytest.raises(UnsupportedCheckpointError, match="gemma3_text"):
        model_config_from_hf({**base, "model_type": "gemma3_text"})


def _posthoc_config(params, anchor_dir, tokenizer_path):
    from hmem_jax.main.common import load_train_config

    return load_train_config(
        ["posthoc_ffn", f"{anchor_dir}/model.gin"],
        params
        + (
            f"TrainConfig.init_from = '{anchor_dir}'",
            f"DataConfig.tokenizer_path = '{tokenizer_path}'",
            "MemoryConfig.level_sizes = (16, 8)",
            "MemoryConfig.lr = 3e-2",
            "MemoryConfig.end_lr = 3e-2",
            "MemoryConfig.warmup_steps = 0",
            "TrainConfig.steps = 24",
            "TrainConfig.batch_size = 8",
            "TrainConfig.seq_len = 64",
            "TrainConfig.log_every = 1",
            "TrainConfig.checkpoint_every = 24",
            "TrainConfig.async_checkpointing = False",
            "MeshConfig.fsdp = 1",
            "MeshConfig.data = 1",
        ),
    )


def test_posthoc_memories_lower_the_loss_while_the_anchor_stays_bitwise_frozen(tmp_path):
    from hmem_jax.data import encyclopedia
    from hmem_jax.data.tokenizer import train_hf_bpe
    from hmem_jax.train.layout import make_loader
    from hmem_jax.train.loop import train
    from hmem_jax.train.resume import fingerprint

    corpus = encyclopedia.cached_corpus(200, 0)
    tokenizer = train_hf_bpe([d.text for d in corpus.documents], 512)
    tokenizer_path = tokenizer.save(str(tmp_path))
    save_tiny(str(tmp_path / "hf"), "llama")
    cfg_model, anchor = load_hf_anchor(str(tmp_path / "hf"))
    anchor_dir = write_anchor_run(str(tmp_path / "anchor"), cfg_model, anchor)
    tree_params = (
        "DataConfig.embedded_entities = 200",
        "HierarchyConfig.branching = 4",
        "HierarchyConfig.depth = 2",
        "HierarchyConfig.samples_per_step = 512",
        "HierarchyConfig.em_steps = 5",
    )
    cfg = _posthoc_config(tree_params, anchor_dir, tokenizer_path)
    assert cfg.memory.mode == "frozen_anchor" and cfg.model == cfg_model
    workdir = str(tmp_path / "posthoc")
    loader = make_loader(cfg, workdir, devices=1)
    result = train(cfg, workdir, loader, fingerprint(loader.fingerprint), devices=jax.devices()[:1])
    losses = np.array([result.losses[k] for k in sorted(result.losses)])
    assert losses[-4:].mean() < losses[:4].mean() - 0.05, losses
    final = jax.tree.map(np.asarray, result.state.params)
    for (path, before), after in zip(
        jax.tree_util.tree_leaves_with_path(anchor), jax.tree.leaves(final)
    ):
        np.testing.assert_array_equal(np.asarray(before, np.float32), after, err_msg=str(path))
    # The run's memory is real: the bank moved away from its initialisation.
    assert dataclasses.is_dataclass(result.state.bank["l1"])
    assert float(np.abs(np.asarray(result.state.bank["l1"].params["down"])).max()) > 0
