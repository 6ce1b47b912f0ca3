"""The hmem_jax anchor's training step against PyTorch on the same CPU: a `transformers`
LlamaForCausalLM of exactly the same shape, trained with plain PyTorch.

    python bench/bench_peer.py [--rounds=3] [--steps=20] [--configs=d256,d512]

Both models: pre-norm Llama blocks (RMSNorm, RoPE, SwiGLU, no biases), tied embeddings, no
qk-norm (Llama has none), float32, batch 8 x 256 tokens of one document per row, AdamW with
weight decay and global-norm clipping at 1.0, one optimizer step per batch. Configurations:

- d256: 6 layers, d_model 256, 4 heads x 64, FFN 1,024, vocabulary 8,192;
- d512: 6 layers, d_model 512, 8 heads x 64, FFN 2,048, vocabulary 8,192.

Each side runs in its own process (`--worker=jax|torch`), interleaved A B A B for `rounds`
rounds, so both see the same machine state; a worker compiles/warms up, then times `steps`
steps and reports their median. The table gives the median over rounds and the ratio
hmem_jax / PyTorch in tokens/s, with the machine (`lscpu` model name) and the date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = {
    "d256": {"d_model": 256, "heads": 4, "d_ff": 1024},
    "d512": {"d_model": 512, "heads": 8, "d_ff": 2048},
}
LAYERS, HEAD_DIM, VOCAB, BATCH, SEQ = 6, 64, 8192, 8, 256
LR, WEIGHT_DECAY, CLIP = 1e-3, 0.05, 1.0


def jax_step_times(config: str, steps: int) -> list[float]:
    import jax
    from bench_step import build

    from hmem_jax.config import ModelConfig, OptimConfig, TrainConfig

    shape = CONFIGS[config]
    model = ModelConfig(
        vocab_size=VOCAB,
        num_layers=LAYERS,
        d_model=shape["d_model"],
        num_heads=shape["heads"],
        head_dim=HEAD_DIM,
        d_ff=shape["d_ff"],
        qk_norm="none",
        tie_embeddings=True,
    )
    optim = OptimConfig(peak_lr=LR, end_lr=LR, warmup_steps=0, weight_decay=WEIGHT_DECAY)
    cfg = TrainConfig(model=model, optim=optim, batch_size=BATCH, seq_len=SEQ, steps=10_000)
    case = build(config, cfg)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        case.state, metrics, _ = case.run(case.state, case.batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return times


def torch_step_times(config: str, steps: int) -> list[float]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = CONFIGS[config]
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=shape["d_model"],
            intermediate_size=shape["d_ff"],
            num_hidden_layers=LAYERS,
            num_attention_heads=shape["heads"],
            num_key_value_heads=shape["heads"],
            head_dim=HEAD_DIM,
            max_position_embeddings=SEQ,
            tie_word_embeddings=True,
            attn_implementation="sdpa",
        )
    )
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    tokens = torch.randint(1, VOCAB, (BATCH, SEQ))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()

    for _ in range(3):  # warm up
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def worker(side: str, config: str, steps: int) -> None:
    times = (jax_step_times if side == "jax" else torch_step_times)(config, steps)
    print(json.dumps({"median_step_s": statistics.median(times)}))


def run_worker(side: str, config: str, steps: int) -> float:
    command = [sys.executable, os.path.abspath(__file__), f"--worker={side}"]
    command += [f"--configs={config}", f"--steps={steps}"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{side} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["median_step_s"]


def machine() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--configs", default="d256,d512")
    parser.add_argument("--worker", choices=["jax", "torch"])
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.configs, args.steps)
        return
    import jax
    import torch

    configs = args.configs.split(",")
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for config in configs:
            for side in ("jax", "torch"):
                times.setdefault((config, side), []).append(run_worker(side, config, args.steps))
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"{machine()}, {os.cpu_count()} cores; jax {jax.__version__}, torch {torch.__version__} "
        f"(threads {torch.get_num_threads()}); {now}; {args.rounds} rounds x {args.steps} steps\n"
    )
    print("| config | hmem_jax tokens/s | PyTorch tokens/s | hmem_jax / PyTorch | per round |")
    print("|---|---|---|---|---|")
    for config in configs:
        jax_step, torch_step = (statistics.median(times[(config, s)]) for s in ("jax", "torch"))
        rounds = ", ".join(
            f"{t / j:.2f}" for j, t in zip(times[(config, "jax")], times[(config, "torch")])
        )
        tokens = BATCH * SEQ
        print(
            f"| {config} | {tokens / jax_step:,.0f} | {tokens / torch_step:,.0f} | "
            f"{torch_step / jax_step:.2f}x | {rounds} |"
        )


if __name__ == "__main__":
    main()
