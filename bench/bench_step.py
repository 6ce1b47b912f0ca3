"""Training-step benchmark: tokens/s and MFU of anchors, and the cost of FFN-memories.

    python bench/bench_step.py [--repeats=5] [--steps=10] [--only=anchor|memory]

Everything is measured in one process, interleaved (A, B, A, B, ...), so ratios
are side by side on the same machine state. The MFU peak is a float32 matmul
of 2048² × 2048² measured in the same process (`hmem_jax.train.metrics`).
Prints a markdown table to paste into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import numpy as np

from hmem_jax import sharding
from hmem_jax.bank.exchange import BlockExchange
from hmem_jax.config import (
    HierarchyConfig,
    MemoryConfig,
    MeshConfig,
    ModelConfig,
    TrainConfig,
    model_preset,
)
from hmem_jax.data.batch import POSITIONS, SEGMENT_IDS, TOKENS, block_ids_key, block_slots_key
from hmem_jax.data.loader import shard_blocks
from hmem_jax.model import Transformer
from hmem_jax.train.memory import MemoryPlan, memory_schedule
from hmem_jax.train.metrics import measure_matmul_peak, train_flops_per_token
from hmem_jax.train.optimizer import learning_rate_schedule, make_optimizer
from hmem_jax.train.state import create_state, state_shardings
from hmem_jax.train.step import StepFunctions, compile_train_step


@dataclasses.dataclass
class Case:
    name: str
    cfg: TrainConfig
    run: object = None
    state: object = None
    batch: dict = None
    times: list = dataclasses.field(default_factory=list)
    temp_bytes: int = 0
    argument_bytes: int = 0
    metrics: dict = None


def build(name: str, cfg: TrainConfig, seed: int = 0, devices: int = 1) -> Case:
    """A compiled, warmed-up step of `cfg` on the first `devices` devices; with memory, every
    sequence on its own leaf path (the most blocks a batch can use)."""
    mesh = sharding.build_mesh(cfg.mesh, jax.devices()[:devices])
    rules = sharding.rules_of(cfg.mesh)
    plan = MemoryPlan.from_config(cfg)
    model = Transformer(cfg.model, lora_scale=plan.lora_scale if plan else 1.0)
    tx = make_optimizer(cfg.optim, cfg.steps)
    shards = state_shardings(model, tx, mesh, rules, plan)
    fns = StepFunctions(
        model=model,
        tx=tx,
        schedule=learning_rate_schedule(cfg.optim, cfg.steps),
        micro_batches=1,
        grad_clip=1.0,
        plan=plan,
        memory_schedule=memory_schedule(cfg.memory, cfg.steps) if plan else None,
        exchange=BlockExchange.for_mesh(mesh, rules) if plan else None,
    )
    state = create_state(model, tx, mesh, rules, seed, plan)
    rng = np.random.default_rng(seed)
    b, t = cfg.batch_size, cfg.seq_len
    local = {
        TOKENS: rng.integers(1, cfg.model.vocab_size, (b, t)).astype(np.int32),
        SEGMENT_IDS: np.ones((b, t), np.int32),
        POSITIONS: np.broadcast_to(np.arange(t), (b, t)).astype(np.int32),
    }
    if plan is not None:
        leaves = rng.choice(plan.geometry.clusters(plan.geometry.depth), b, replace=False)
        batch_shards = sharding.batch_shards(mesh, rules)
        for level in plan.levels:
            clusters = plan.geometry.clusters(level)
            ids_per_seq = leaves // plan.geometry.branching ** (plan.geometry.depth - level)
            ids, slots, _ = shard_blocks(
                ids_per_seq, batch_shards, min(b // batch_shards, clusters), clusters
            )
            local[block_ids_key(level)], local[block_slots_key(level)] = ids, slots
    batch = sharding.global_batch(local, mesh, rules)
    run = compile_train_step(fns, mesh, rules, shards)
    case = Case(name, cfg, run, state, batch)
    analysis = run.compiled(state, batch).memory_analysis()
    if analysis is not None:
        case.temp_bytes = int(analysis.temp_size_in_bytes)
        case.argument_bytes = int(analysis.argument_size_in_bytes)
    case.state, metrics, _ = run(case.state, batch)  # compile + warm up
    case.metrics = jax.device_get(metrics)
    return case


def time_steps(case: Case, steps: int) -> float:
    start = time.perf_counter()
    metrics = None
    for _ in range(steps):
        case.state, metrics, _ = case.run(case.state, case.batch)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / steps


def run_cases(cases: list[Case], repeats: int, steps: int) -> None:
    for _ in range(repeats):
        for case in cases:
            case.times.append(time_steps(case, steps))


def anchor_configs() -> list[tuple[str, TrainConfig]]:
    default = TrainConfig(model=model_preset("tiny"), batch_size=16, seq_len=256)
    d512 = ModelConfig(
        vocab_size=2048, num_layers=6, d_model=512, num_heads=8, head_dim=64, d_ff=2048
    )
    return [
        ("default anchor (tiny: 4 x d128, 1.3M params), batch 16 x 256", default),
        (
            "d=512 anchor (6 x d512, 20M params), batch 8 x 256",
            TrainConfig(model=d512, batch_size=8, seq_len=256),
        ),
    ]


def memory_configs() -> list[tuple[str, TrainConfig]]:
    model = ModelConfig(
        vocab_size=2048, num_layers=6, d_model=256, num_heads=4, head_dim=64, d_ff=1024
    )
    base = TrainConfig(
        model=model,
        batch_size=16,
        seq_len=256,
        hierarchy=HierarchyConfig(branching=8, depth=3),
        mesh=MeshConfig(),
    )
    # Anchor ≈ 5.8M matmul params; fetched = 3·6·256·(64+32+16) = 516k ≈ 10%.
    memory = MemoryConfig(kind="ffn", level_sizes=(64, 32, 16), generic_probability=0.0)
    return [
        ("anchor alone (6 x d256)", base),
        ("anchor + FFN memory, gather", dataclasses.replace(base, memory=memory)),
        (
            "anchor + FFN memory, grouped (ragged_dot)",
            dataclasses.replace(base, memory=dataclasses.replace(memory, application="grouped")),
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--only", choices=["anchor", "memory", "all"], default="all")
    args = parser.parse_args()
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{jax.devices()[0].device_kind}, {jax.local_device_count()} device(s)"
    )
    peaks = [measure_matmul_peak.__wrapped__() for _ in range(3)]
    peak = max(peaks)
    print(f"measured fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s (best of {peaks})\n")

    if args.only in ("anchor", "all"):
        cases = [build(name, cfg) for name, cfg in anchor_configs()]
        run_cases(cases, args.repeats, args.steps)
        print("| anchor | step time (median) | tokens/s | MFU vs measured peak |")
        print("|---|---|---|---|")
        for case in cases:
            step = statistics.median(case.times)
            tokens = case.cfg.batch_size * case.cfg.seq_len
            flops = train_flops_per_token(case.cfg.model, case.cfg.seq_len) * tokens
            print(
                f"| {case.name} | {step:.3f} s | {tokens / step:,.0f} | {flops / step / peak:.1%} |"
            )
        print()

    if args.only in ("memory", "all"):
        cases = [build(name, cfg) for name, cfg in memory_configs()]
        run_cases(cases, args.repeats, args.steps)
        base = statistics.median(cases[0].times)
        print(
            "| variant | step time (median) | ratio to anchor | fetched params | "
            "unique blocks' bytes | step temp memory |"
        )
        print("|---|---|---|---|---|---|")
        for case in cases:
            step = statistics.median(case.times)
            plan = MemoryPlan.from_config(case.cfg)
            fetched = plan.geometry.fetched_params if plan else 0
            unique_bytes = 0
            if plan:
                for level in plan.levels:
                    unique = int(
                        np.sum(
                            np.asarray(case.batch[block_ids_key(level)])
                            < plan.geometry.clusters(level)
                        )
                    )
                    unique_bytes += unique * plan.geometry.block_params(level) * 4
            print(
                f"| {case.name} | {step:.3f} s | {step / base:.3f} | {fetched:,} | "
                f"{unique_bytes / 1e6:.1f} MB | {case.temp_bytes / 1e6:.1f} MB |"
            )


if __name__ == "__main__":
    main()
