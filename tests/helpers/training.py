"""Training helpers: the memory-training tests' config (batch 8, 6 steps, checkpoints every 3,
ffn memory (8, 4), one device), with per-test overrides."""

import dataclasses

from hmem_jax.main.common import load_train_config

MEMORY_BINDINGS = (
    "TrainConfig.batch_size = 8",
    "TrainConfig.steps = 6",
    "TrainConfig.log_every = 1",
    "TrainConfig.checkpoint_every = 3",
    "TrainConfig.async_checkpointing = False",
    "MemoryConfig.kind = 'ffn'",
    "MemoryConfig.level_sizes = (8, 4)",
    "MemoryConfig.lr = 1e-2",
    "MemoryConfig.end_lr = 1e-3",
    "MemoryConfig.warmup_steps = 1",
    "MeshConfig.fsdp = 1",
    "MeshConfig.data = 1",
)


def memory_config(params, **overrides):
    memory = overrides.pop("memory", {})
    cfg = load_train_config(
        (),
        params + MEMORY_BINDINGS,
    )
    return dataclasses.replace(cfg, memory=dataclasses.replace(cfg.memory, **memory), **overrides)


def assert_close_to_scale(got, want, rtol=1e-3, of_scale=1e-3, err_msg=""):
    """Elementwise |got - want| <= rtol |want| + of_scale * max |want|: a tolerance that scales
    with the values compared (an optimizer moment of 1e-6 is not compared at 1e-4)."""
    import numpy as np

    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=of_scale * scale, err_msg=err_msg)
