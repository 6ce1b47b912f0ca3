"""Benchmark the streamed memory bank (BENCHMARKS.md "## Memory bank (streaming)").

    python bench/bench_bank.py ratio     [--steps=40]    streamed/device step time, prefetch on/off
    python bench/bench_bank.py gather    [--blocks=64]   store gather vs raw read of the same bytes
    python bench/bench_bank.py paper160m [--steps=20]    160M geometry (4.62B bank), streamed
    python bench/bench_bank.py paper1p4b                 1.4B geometry bank (21.14B): open + fetch

Batches are synthetic (random tokens, random leaf paths; block ids and slots
built exactly like hmem_jax.data.loader), so any tree geometry can be
benchmarked without fitting a 65,536-leaf tree. Prints one JSON object per mode.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from hmem_jax.config import (
    HierarchyConfig,
    MemoryConfig,
    MeshConfig,
    ModelConfig,
    TrainConfig,
    model_preset,
)
from hmem_jax.data import batch as schema
from hmem_jax.data.loader import shard_blocks


class SyntheticBatches:
    """batch(step): random tokens and leaf paths; per-level unique block ids + slots (padded)."""

    def __init__(self, cfg: TrainConfig, seed: int = 0) -> None:
        self.cfg, self.seed = cfg, seed
        self.levels = [l for l, r in enumerate(cfg.memory.level_sizes, 1) if r > 0]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        cfg, b = self.cfg, self.cfg.batch_size
        rng = np.random.default_rng([self.seed, step])
        tokens = rng.integers(1, cfg.model.vocab_size, (b, cfg.seq_len)).astype(np.int32)
        out = {
            schema.TOKENS: tokens,
            schema.SEGMENT_IDS: np.ones_like(tokens),
            schema.POSITIONS: np.broadcast_to(
                np.arange(cfg.seq_len, dtype=np.int32), tokens.shape
            ).copy(),
        }
        branching = cfg.hierarchy.branching
        path = rng.integers(0, branching, (b, cfg.hierarchy.depth))
        block = np.zeros(b, np.int64)
        for level in range(1, cfg.hierarchy.depth + 1):
            block = block * branching + path[:, level - 1]
            if level not in self.levels:
                continue
            clusters = branching**level
            ids, slots, union = shard_blocks(block, 1, min(b, clusters), clusters, level)
            out[schema.block_ids_key(level)], out[schema.block_slots_key(level)] = ids, slots
            out[schema.block_union_key(level)] = union
        return out

    batch_shards = 1  # one device

    def iterate(self, start_step: int):
        step = start_step
        while True:
            yield step, self.batch(step)
            step += 1


def config(
    model: ModelConfig,
    level_sizes: tuple[int, ...],
    branching: int,
    batch: int,
    seq_len: int,
    steps: int,
    **memory,
) -> TrainConfig:
    return TrainConfig(
        model=model,
        hierarchy=HierarchyConfig(branching=branching, depth=len(level_sizes)),
        memory=MemoryConfig(
            kind="ffn", level_sizes=level_sizes, generic_probability=0.0, warmup_steps=1, **memory
        ),
        mesh=MeshConfig(data=1, fsdp=1),
        steps=steps,
        batch_size=batch,
        seq_len=seq_len,
        log_every=1,
        checkpoint_every=10**6,
        keep_checkpoints=2,
    )


def run(cfg: TrainConfig, workdir: str) -> list[dict]:
    import jax

    from hmem_jax.train.loop import train

    train(cfg, workdir, SyntheticBatches(cfg), "synthetic", devices=jax.devices()[:1])
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def summarise(rows: list[dict], skip: int) -> dict:
    rows = rows[skip:]
    mean = lambda k: float(np.mean([r[k] for r in rows])) if k in rows[0] else None  # noqa: E731
    return {
        "step_time_s": mean("perf/step_time_s"),
        "fetch_bytes_per_step": mean("mem/fetch_bytes"),
        "store_read_bytes_per_step": mean("mem/store_read_bytes"),
        "store_write_bytes_per_step": mean("mem/store_write_bytes"),
        "fetch_wait_s": mean("mem/fetch_wait_s"),
        "cache_hit_rate": mean("mem/cache_hit_rate"),
    }


def bench_ratio(steps: int) -> dict:
    """Step time of the device tier against the streamed tier (prefetch 0 and 2), same data."""
    model = ModelConfig(
        vocab_size=2048, num_layers=4, d_model=256, num_heads=4, head_dim=64, d_ff=1024
    )
    out = {}
    streamed = {"bank_tier": "streaming"}
    with tempfile.TemporaryDirectory() as tmp:
        for name, memory in (
            ("device", {}),
            ("streamed_prefetch0", {**streamed, "prefetch_steps": 0}),
            ("streamed_prefetch2", {**streamed, "prefetch_steps": 2}),
            ("device_again", {}),
        ):
            cfg = config(model, (32, 16, 8), 16, 16, 128, steps, **memory)
            out[name] = summarise(run(cfg, os.path.join(tmp, name)), skip=5)
    device = (out["device"]["step_time_s"] + out["device_again"]["step_time_s"]) / 2
    for name in ("streamed_prefetch0", "streamed_prefetch2"):
        out[name]["ratio_to_device"] = out[name]["step_time_s"] / device
    return out


def _best_ms(fn, repeats: int = 5) -> float:
    fn()  # warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def bench_gather(blocks: int) -> dict:
    """Random blocks: BankStore.read vs raw reads of the same chunk files, page cache warm.

    Raw reads go into one fresh array (what a fetch must produce) and into a
    reused buffer (the memcpy floor); 'no checksum' reads the same blocks from
    a zarr3 array without the crc32c codec, to show what the checksum costs.
    """
    import tensorstore as ts

    from hmem_jax.bank.geometry import BankGeometry
    from hmem_jax.bank.store import BankStore

    model = ModelConfig(num_layers=35, d_model=512, num_heads=16, head_dim=32, d_ff=2048)
    mem = MemoryConfig(kind="ffn", level_sizes=(0, 0, 16, 0))
    geometry = BankGeometry.from_configs(model, mem, HierarchyConfig(branching=16, depth=4))
    out = {}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        for shard in (1, 16):
            path = os.path.join(tmp, f"bank{shard}")
            store = BankStore(
                {"driver": "file", "path": path + "/"},
                geometry,
                False,
                "bfloat16",
                "float32",
                0,
                blocks_per_shard=shard,
            )
            written = np.arange(0, 4096, 4)
            for start in range(0, len(written), 64):
                ids = written[start : start + 64]
                store.write("l3", ids, store.read("l3", ids))
            ids = np.sort(rng.choice(written, blocks, replace=False))
            store_ms = _best_ms(lambda: store.read("l3", ids))
            files = [
                os.path.join(d, f)
                for d, _, fs in os.walk(os.path.join(path, "g00000000"))
                for f in fs
                if f != "zarr.json"
            ]
            wanted = {str(i // shard) for i in ids}
            files = [f for f in files if f.split("/c/")[1].split("/")[0] in wanted]
            sizes = [os.path.getsize(f) for f in files]
            reused = np.empty(max(sizes), np.uint8)

            def raw(fresh: bool) -> None:
                target = np.empty(sum(sizes), np.uint8) if fresh else None
                offset = 0
                for name, size in zip(files, sizes):
                    view = memoryview(target)[offset : offset + size] if fresh else reused
                    with open(name, "rb", buffering=0) as handle:
                        handle.readinto(view)
                    offset += size

            result = {
                "blocks": blocks,
                "block_bytes": store.layouts["l3"].block_bytes,
                "store_read_ms": store_ms,
                "raw_read_fresh_ms": _best_ms(lambda: raw(True)),
                "raw_read_reused_buffer_ms": _best_ms(lambda: raw(False)),
                "raw_bytes": sum(sizes),
            }
            if shard == 1:
                rows = store.read("l3", ids)
                arrays = {}
                for field, value in rows.items():
                    chunk = [1, *value.shape[1:]]
                    arrays[field] = ts.open(
                        {
                            "driver": "zarr3",
                            "kvstore": {"driver": "file", "path": f"{tmp}/plain/{field}/"},
                            "metadata": {
                                "shape": list(value.shape),
                                "data_type": value.dtype.name,
                                "chunk_grid": {
                                    "name": "regular",
                                    "configuration": {"chunk_shape": chunk},
                                },
                            },
                        },
                        create=True,
                    ).result()
                    arrays[field].write(value).result()

                def plain() -> None:
                    target = {f: np.empty_like(v) for f, v in rows.items()}
                    futures = [
                        ts.array(target[f], copy=False, write=True)[k].write(a[k])
                        for f, a in arrays.items()
                        for k in range(len(ids))
                    ]
                    for future in futures:
                        future.result()

                result["store_read_no_checksum_ms"] = _best_ms(plain)
            out[f"blocks_per_shard_{shard}"] = result
    return out


def disk_bytes(path: str) -> int:
    du = subprocess.run(["du", "-sb", path], capture_output=True, text=True)
    return int(du.stdout.split()[0])


def bench_paper(
    name: str, steps: int, layers: int, batch: int, moment_dtype: str, cache_bytes: int
) -> dict:
    """Train `steps` steps streamed from local disk at the paper's bank geometry."""
    level_sizes = {"160m": (256, 64, 16, 0), "1p4b": (768, 256, 16, 0)}[name]
    model = model_preset(name, num_layers=layers)
    cfg = config(
        model,
        level_sizes,
        16,
        batch,
        64,
        steps,
        bank_tier="streaming",
        bank_dtype="bfloat16",
        moment_dtype=moment_dtype,
        host_cache_bytes=cache_bytes,
        prefetch_steps=1,
    )
    cfg = dataclasses.replace(cfg, checkpoint_every=10)
    from hmem_jax.bank.geometry import BankGeometry

    geometry = BankGeometry.from_configs(cfg.model, cfg.memory, cfg.hierarchy)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        start = time.perf_counter()
        rows = run(cfg, tmp)
        wall = time.perf_counter() - start
        from hmem_jax.bank.store import BankStore

        store = BankStore(
            {"driver": "file", "path": os.path.join(tmp, "bank") + "/"},
            geometry,
            False,
            "bfloat16",
            moment_dtype,
            0,
            create=False,
            writer=False,
        )
        store.restore(store.versions()[-1])
        touched = {k: int(store.touched(k).sum()) for k in store.layouts}
        expected = sum(store.layouts[k].block_bytes * n for k, n in touched.items())
        return {
            "geometry": name,
            "memory_layers": layers,
            "batch": batch,
            "moment_dtype": moment_dtype,
            "host_cache_bytes": cache_bytes,
            "bank_params": geometry.bank_params,
            "steps": steps,
            "wall_s": wall,
            **summarise(rows, skip=2),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "touched_blocks": touched,
            "touched_bytes": expected,
            "disk_bytes": disk_bytes(os.path.join(tmp, "bank")),
            "losses": [r["train/loss"] for r in rows],
        }


def bench_open_1p4b() -> dict:
    """Open the 1.4B geometry's bank (21.14B parameters) and fetch one block per level."""
    from hmem_jax.bank.geometry import BankGeometry
    from hmem_jax.bank.store import BankStore

    model = ModelConfig(num_layers=24, d_model=2048, num_heads=16, head_dim=128, d_ff=5632)
    memory = MemoryConfig(kind="ffn", level_sizes=(768, 256, 16, 0))
    geometry = BankGeometry.from_configs(model, memory, HierarchyConfig(branching=16, depth=4))
    out = {"bank_params": geometry.bank_params, "levels": {}}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        start = time.perf_counter()
        store = BankStore(
            {"driver": "file", "path": tmp + "/"}, geometry, False, "bfloat16", "float32", 0
        )
        out["open_s"] = time.perf_counter() - start
        for key, layout in store.layouts.items():
            ids = np.array([layout.clusters - 1])
            t0 = time.perf_counter()
            rows = store.read(key, ids)  # never written: materialised from (seed, level, id)
            t1 = time.perf_counter()
            store.write(key, ids, rows)
            t2 = time.perf_counter()
            store.read(key, ids)
            t3 = time.perf_counter()
            out["levels"][key] = {
                "block_bytes": layout.block_bytes,
                "materialise_s": t1 - t0,
                "write_s": t2 - t1,
                "stored_read_s": t3 - t2,
            }
        out["disk_bytes"] = disk_bytes(tmp)
        out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["ratio", "gather", "paper160m", "paper1p4b"])
    parser.add_argument("--steps", type=int, default=0)
    parser.add_argument("--blocks", type=int, default=64)
    parser.add_argument("--layers", type=int, default=35)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--moment_dtype", default="float32")
    parser.add_argument("--cache_gb", type=float, default=2.0)
    args = parser.parse_args()
    if args.mode == "ratio":
        result = bench_ratio(args.steps or 40)
    elif args.mode == "gather":
        result = bench_gather(args.blocks)
    elif args.mode == "paper160m":
        result = bench_paper(
            "160m",
            args.steps or 20,
            args.layers,
            args.batch,
            args.moment_dtype,
            int(args.cache_gb * 2**30),
        )
    else:
        result = bench_open_1p4b()
    print(json.dumps({"mode": args.mode, "python": sys.version.split()[0], **result}, indent=1))


if __name__ == "__main__":
    main()
