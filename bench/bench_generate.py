"""Generation throughput (tokens/s) with a KV cache, with and without fetched FFN memory.

    python bench/bench_generate.py [--preset tiny] [--batch 1,8] [--new 64] [--repeats 3]
    python bench/bench_generate.py --cache_scaling [--batch 8]

A randomly initialised anchor (speed does not depend on the weights) and a
random path memory per row of the batch (level sizes `--levels`). Reports the
best of `--repeats` interleaved timed runs after one compile run, prefill included
(the best is the least disturbed by other processes on a shared machine).

`--cache_scaling` times one compiled decode step (`Transformer.extend` of one token per row)
against caches of several sizes and fill levels, the cache index set to the fill: how a step's
cost depends on the room the cache was made with and on the tokens written so far.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from hmem_jax.bank.geometry import BankGeometry
from hmem_jax.config import HierarchyConfig, MemoryConfig, model_preset
from hmem_jax.infer.decode import Decoder, Sampling
from hmem_jax.model import Transformer, count_params
from hmem_jax.model import memory as memory_lib


def random_memory(cfg, levels, batch):
    geometry = BankGeometry.from_configs(
        cfg,
        MemoryConfig(kind="ffn", level_sizes=levels),
        HierarchyConfig(branching=16, depth=len(levels)),
    )
    fetched = {
        level: {
            name: 0.02
            * jax.random.normal(
                jax.random.key(level * 10 + i), (batch,) + geometry.block_shape(name, level)
            )
            for i, name in enumerate(sorted(geometry.matrices))
        }
        for level in geometry.active_levels
    }
    slots = {level: jnp.arange(batch) for level in geometry.active_levels}
    rank_axes = {n: m.rank_axis for n, m in geometry.matrices.items()}
    return memory_lib.sequence_memory(fetched, slots, rank_axes), geometry.fetched_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--levels", default="64,32,16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache_scaling", action="store_true")
    args = parser.parse_args()
    cfg = model_preset(args.preset)
    levels = tuple(int(x) for x in args.levels.split(","))
    model = Transformer(cfg)
    ids = jnp.zeros((1, 8), jnp.int32)
    params = model.init(jax.random.key(0), ids, ids + 1, ids)["params"]
    if args.cache_scaling:
        cache_scaling(model, params, int(args.batch.split(",")[-1]), args.repeats)
        return
    decoder = Decoder(model, params)
    print(
        f"preset {args.preset}: {count_params(params):,} anchor parameters, "
        f"{jax.devices()[0].platform}, prompt {args.prompt}, {args.new} new tokens"
    )
    print(f"{'batch':>5} {'memory':>22} {'tokens/s':>10} {'ms/token-step':>14}")
    for batch in (int(b) for b in args.batch.split(",")):
        prompts = np.random.default_rng(0).integers(1, cfg.vocab_size, (batch, args.prompt))
        prompts = [list(map(int, row)) for row in prompts]
        memory, fetched = random_memory(cfg, levels, batch)
        variants = (("none", None), (f"ffn {fetched:,} params", memory))
        sampling = Sampling(max_new_tokens=args.new)
        for _, mem in variants:
            decoder.generate(prompts, sampling, mem)  # compile
        times: dict[str, list[float]] = {name: [] for name, _ in variants}
        for _ in range(args.repeats):  # interleaved, so a busy machine slows both alike
            for name, mem in variants:
                start = time.perf_counter()
                decoder.generate(prompts, sampling, mem)
                times[name].append(time.perf_counter() - start)
        for name, _ in variants:
            seconds = min(times[name])
            print(
                f"{batch:>5} {name:>22} {batch * args.new / seconds:>10,.0f} "
                f"{1000 * seconds / args.new:>14.2f}",
                flush=True,
            )


def cache_scaling(model: Transformer, params, batch: int, repeats: int) -> None:
    from hmem_jax.model.cache import init_cache

    def extend(params, tokens, cache):
        return model.apply(
            {"params": params}, tokens, tokens, tokens + 2, cache, None, method=Transformer.extend
        )

    step = jax.jit(extend, donate_argnums=(2,))
    tokens = jnp.ones((batch, 1), jnp.int32)
    print(f"{'slots':>6} {'filled':>7} {'ms per decode step':>19}")
    for slots, filled in (
        (128, 127),
        (512, 64),
        (512, 511),
        (2048, 64),
        (2048, 1024),
        (2048, 2047),
    ):
        cache = init_cache(model.cfg, batch, slots)
        best = float("inf")
        for attempt in range(repeats + 1):  # the first compiles
            start = time.perf_counter()
            for _ in range(30):
                at = cache.replace(index=jnp.array(filled - 1, jnp.int32))
                logits, cache = step(params, tokens, at)
            jax.block_until_ready(logits)
            if attempt:
                best = min(best, (time.perf_counter() - start) / 30)
        print(f"{slots:>6} {filled:>7} {1000 * best:>19.2f}", flush=True)


if __name__ == "__main__":
    main()
