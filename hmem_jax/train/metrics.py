"""Training metrics: FLOP accounting, MFU, and writers (console, TensorBoard, JSONL).

Metric names are stable: `train/loss`, `train/grad_norm`,
`train/lr`, `perf/step_time_s`, `perf/tokens_per_s`, `perf/mfu`, ...
Only process 0 writes files.
"""

from __future__ import annotations

import functools
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hmem_jax import paths
from hmem_jax.config import ModelConfig

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

# Dense bf16 peak FLOP/s per device, by `device_kind` prefix (vendor data sheets).
PEAK_FLOPS_BY_DEVICE_KIND = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA B200": 2250e12,
    "NVIDIA GH200": 989e12,
}


def matmul_param_count(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: projections, FFN and the output head."""
    q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    per_layer = cfg.d_model * (2 * q_width + 2 * kv_width) + 3 * cfg.d_model * cfg.d_ff
    return cfg.num_layers * per_layer + cfg.d_model * cfg.vocab_size


def train_flops_per_token(cfg: ModelConfig, seq_len: int, fetched_params: int = 0) -> float:
    """Training FLOPs per token (forward + backward = 3 × forward), PaLM appendix B style:

        6 · (N_matmul + N_fetched)  +  12 · L · (heads · head_dim) · T

    N_matmul counts weights used in matmuls (attention projections, SwiGLU, the
    vocabulary head; not the embedding lookup or norms); N_fetched the fetched
    memory's weights, which every token multiplies like the anchor's (exact
    for FFN and LoRA memories). The last term is QKᵀ and AV over the full
    context T (document masking is not discounted).
    """
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    return 6.0 * (matmul_param_count(cfg) + fetched_params) + attention


@functools.cache
def measure_matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of a square float32 matmul on the default device (the CPU's practical peak)."""
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best


def peak_flops_per_device(override_tflops: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of one device, how it was obtained)."""
    if override_tflops > 0:
        return override_tflops * 1e12, "configured"
    kind = jax.devices()[0].device_kind
    for prefix, flops in sorted(PEAK_FLOPS_BY_DEVICE_KIND.items(), key=lambda kv: -len(kv[0])):
        if kind.startswith(prefix):
            return flops, f"dense bf16 data sheet ({kind})"
    if jax.default_backend() == "cpu":
        # Forced host devices share the same cores: the peak is of the whole host.
        return measure_matmul_peak() / jax.local_device_count(), "measured fp32 matmul"
    return float("nan"), f"unknown device kind {kind!r}"


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class MetricWriter:
    """One console line per logged step; TensorBoard events and `metrics.jsonl` in the workdir.

    On an object-store workdir both are written to a local mirror (objects cannot be appended
    to) and uploaded whole by `sync`: every `sync_every_s` seconds, after each checkpoint (the
    loop calls it) and at `close`. A resumed run first copies the workdir's metrics.jsonl in,
    so the file keeps its history."""

    def __init__(
        self,
        workdir: str,
        total_steps: int,
        enabled: bool | None = None,
        sync_every_s: float = 60.0,
    ) -> None:
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.total_steps = total_steps
        self.sync_every_s = sync_every_s
        self._tb = None
        self._jsonl = None
        self._mirror: paths.LocalMirror | None = None
        self._synced_at = time.monotonic()
        if self.enabled:
            paths.makedirs(workdir)
            self._mirror = paths.LocalMirror(workdir)
            self._mirror.pull(METRICS_FILE)
            self._jsonl = open(self._mirror.path(METRICS_FILE), "a", buffering=1)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(self._mirror.path(TENSORBOARD_DIR), flush_secs=10)

    def sync(self) -> None:
        """Upload the metrics written so far (a no-op for a local workdir)."""
        if self._mirror is None or not self._mirror.remote:
            return
        assert self._jsonl is not None and self._tb is not None
        self._jsonl.flush()
        self._tb.flush()
        self._push()

    def _push(self) -> None:
        assert self._mirror is not None
        self._mirror.push(METRICS_FILE)
        self._mirror.push(TENSORBOARD_DIR)
        self._synced_at = time.monotonic()

    def write(self, step: int, metrics: dict[str, Any], eta_s: float | None = None) -> None:
        values = {k: float(np.asarray(v)) for k, v in metrics.items()}
        if not self.enabled:
            return
        assert self._jsonl is not None and self._tb is not None
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        for name, value in values.items():
            self._tb.add_scalar(name, value, step)
        line = [f"step {step}/{self.total_steps}"]
        for name, fmt in (
            ("train/loss", "loss {:.4f}"),
            ("train/grad_norm", "gnorm {:.3f}"),
            ("train/lr", "lr {:.2e}"),
            ("perf/tokens_per_s", "{:,.0f} tok/s"),
            ("perf/mfu", "mfu {:.1%}"),
            ("perf/step_time_s", "{:.3f} s/step"),
            ("perf/data_wait_s", "data {:.3f} s"),
        ):
            if name in values:
                line.append(fmt.format(values[name]))
        if eta_s is not None:
            line.append(f"eta {format_duration(eta_s)}")
        print(" | ".join(line), flush=True)
        if time.monotonic() - self._synced_at >= self.sync_every_s:
            self.sync()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._mirror is not None:
            try:
                if self._mirror.remote:
                    self._push()
            finally:
                self._mirror.close()
