"""Starting the train command as a subprocess on the small corpus, and reading what it wrote."""

import json
import os
import sys
import time

ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")


def params_for(small_prepared_data, steps):
    """Bindings of an anchor-only run of `steps` steps on the small corpus, logging every step."""
    _, params = small_prepared_data
    return params + (
        "MemoryConfig.kind = 'none'",
        f"TrainConfig.steps = {steps}",
        "TrainConfig.batch_size = 4",
        "TrainConfig.log_every = 1",
        "TrainConfig.checkpoint_every = 1000",
    )


def command(workdir, params, *flags):
    """The train command line (no probe afterwards)."""
    args = [sys.executable, "-m", "hmem_jax.main.train", f"--workdir={workdir}", "--probe_limit=0"]
    return args + list(flags) + [f"--gin_param={p}" for p in params]


def losses(workdir):
    """step -> train/loss of every row of metrics.jsonl."""
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["train/loss"] for r in rows}


def wait_for_step(workdir, step, procs, timeout=300):
    """Until metrics.jsonl shows `step` (the run is past compilation, mid-training)."""
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.isfile(path) and any(
            json.loads(line)["step"] >= step for line in open(path) if line.strip()
        ):
            return
        assert all(p.poll() is None for p in procs), "a trainer ended before it was signalled"
        time.sleep(0.05)
    raise AssertionError(f"no step {step} in {path} after {timeout} s")


def checkpoints(workdir):
    """The sorted steps of the checkpoints in the workdir."""
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
