"""Weak scaling of the memory step on fake CPU devices: per-device bytes and step time.

At a fixed per-device batch, a mesh of N = 1, 2, 4, 8 devices (data = N): what one device holds
and receives for memory per step, and the memory step's time against the anchor's, measured
side by side (interleaved rounds). The fetched memory is 10.0% of the anchor's matmul
parameters (`train.metrics.matmul_param_count`: attention, SwiGLU and the vocabulary head; the
fetched count is one path's blocks at every layer). The N fake devices share this machine's
cores, so absolute step times grow with N (N times the work on the same cores); the ratio to the
anchor at each N is the figure to read.

    python bench/bench_scaling.py [--repeats=3 --steps=3]
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import statistics  # noqa: E402

import jax  # noqa: E402
from bench_step import build, run_cases  # noqa: E402

from hmem_jax.bank.footprint import memory_footprint  # noqa: E402
from hmem_jax.config import HierarchyConfig, MemoryConfig, MeshConfig, ModelConfig, TrainConfig  # noqa: E402
from hmem_jax.train.memory import MemoryPlan  # noqa: E402
from hmem_jax.train.metrics import matmul_param_count  # noqa: E402

MODEL = ModelConfig(vocab_size=2048, num_layers=4, d_model=256, num_heads=4, head_dim=64, d_ff=1024)
# 3 matrices x 4 layers x 256 x (64 + 48 + 42) = 473,088 = 10.03% of 4,718,592 matmul params.
MEMORY = MemoryConfig(kind="ffn", level_sizes=(64, 48, 42), generic_probability=0.0)


def configs(devices: int, per_device_batch: int, seq_len: int) -> tuple[TrainConfig, TrainConfig]:
    anchor = TrainConfig(
        model=MODEL,
        batch_size=per_device_batch * devices,
        seq_len=seq_len,
        hierarchy=HierarchyConfig(branching=8, depth=3),
        mesh=MeshConfig(data=devices, fsdp=1),
    )
    return anchor, dataclasses.replace(anchor, memory=MEMORY)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--per_device_batch", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=128)
    args = parser.parse_args()
    anchor_cfg, memory_cfg = configs(1, args.per_device_batch, args.seq_len)
    fetched = MemoryPlan.from_config(memory_cfg).geometry.fetched_params
    share = fetched / matmul_param_count(MODEL)
    print(
        f"jax {jax.__version__}, {jax.device_count()} fake CPU devices; fetched {fetched:,} = "
        f"{share:.2%} of {matmul_param_count(MODEL):,} matmul params; per-device batch "
        f"{args.per_device_batch} x {args.seq_len}\n"
    )
    print(
        "| devices | global batch | bank per device | bank argument bytes per device | "
        "blocks fetched per device per step (mem/fetch_bytes) | distinct blocks of the global "
        "batch | extra step temp per device | anchor step | memory step | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for devices in (1, 2, 4, 8):
        anchor_cfg, memory_cfg = configs(devices, args.per_device_batch, args.seq_len)
        cases = [
            build("anchor", anchor_cfg, devices=devices),
            build("memory", memory_cfg, devices=devices),
        ]
        run_cases(cases, args.repeats, args.steps)
        anchor, memory = cases
        footprint = memory_footprint(memory_cfg, devices, args.per_device_batch)
        times = [statistics.median(c.times) for c in cases]
        mb = lambda x: f"{x / 1e6:.2f} MB"  # noqa: E731
        print(
            f"| {devices} | {memory_cfg.batch_size} | {mb(footprint.bank_bytes_per_device)} | "
            f"{mb(memory.argument_bytes - anchor.argument_bytes)} | "
            f"{mb(float(memory.metrics['mem/fetch_bytes']))} | "
            f"{mb(footprint.memory_step_bytes)} | "
            f"{mb(memory.temp_bytes - anchor.temp_bytes)} | {times[0]:.3f} s | "
            f"{times[1]:.3f} s | {times[1] / times[0]:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
