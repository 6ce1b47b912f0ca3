"""The small corpus and model every end-to-end test trains on, running an entry point, and
hashing what a run folder holds (to show a command left it as it was)."""

import hashlib
import os

SMALL_CORPUS_PARAMS = (
    "DataConfig.embedded_entities = 200",
    "DataConfig.vocab_size = 512",
    "model_preset.vocab_size = 512",
    "TrainConfig.model = @model_preset()",
    "model_preset.name = 'tiny'",
    "model_preset.num_layers = 2",
    "model_preset.d_model = 64",
    "model_preset.d_ff = 128",
    "model_preset.num_heads = 2",
    "TrainConfig.seq_len = 64",
)

SMALL_TREE_PARAMS = SMALL_CORPUS_PARAMS + (
    "HierarchyConfig.branching = 4",
    "HierarchyConfig.depth = 2",
    "HierarchyConfig.samples_per_step = 512",
    "HierarchyConfig.em_steps = 5",
)


def run_entry_point(module: str, workdir, params, devices: int, *flags: str, timeout=900, env=None):
    """`python -m MODULE --workdir=... FLAGS --gin_param=...` with `devices` fake CPU devices
    (and the extra environment variables `env`)."""
    import subprocess
    import sys

    args = [sys.executable, "-m", module, f"--workdir={workdir}", *flags]
    args += [f"--gin_param={p}" for p in params]
    env = dict(
        os.environ, **(env or {}), XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"
    )
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


def tree_hashes(root):
    """path (relative to `root`) -> sha256 of every file under `root`."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                out[os.path.relpath(path, root)] = hashlib.sha256(handle.read()).hexdigest()
    return out
