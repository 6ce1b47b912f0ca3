"""Benchmark the data pipeline: prepare throughput (documents/s) and loader throughput (tokens/s).

    python bench/bench_loader.py [--entities=3000] [--minilm_entities=300] [--steps=30]

Prepares the embedded encyclopedia routed through a hashed-embedder ClusterTree
(branching 16, depth 2: 16 / 256 clusters), once with the 'hashed' embedder and,
when the `embed` extra is installed, once with 'minilm' (on a smaller corpus:
MiniLM embeds a few hundred documents per second on CPU); then reads batches
with paths and per-level unique block ids at two shapes (the default seq_len
256, and the paper's 2,048), both by calling `batch(step)` in a loop (one
thread) and through `iterate()` (background threads + prefetch). Prints one
JSON object; BENCHMARKS.md "## Data pipeline" quotes it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time

from hmem_jax.config import DataConfig, HierarchyConfig
from hmem_jax.data import prepare as prepare_lib
from hmem_jax.data.loader import Loader
from hmem_jax.data.sources import read_documents


def _cpu_model() -> str:
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(
            line.split(":", 1)[1].strip()
            for line in output.splitlines()
            if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def _fit_tree(data: DataConfig, embedder_name: str, directory: str) -> float:
    from hmem_jax.hierarchy.embedders import fit_embedder, get_embedder
    from hmem_jax.hierarchy.tree import ClusterTree

    started = time.perf_counter()
    texts = [d.text for d in read_documents(data)]
    embedder = get_embedder(embedder_name)
    fit_embedder(embedder, texts)
    embeddings = embedder.embed(texts)
    tree = ClusterTree.fit(
        embeddings,
        HierarchyConfig(
            embedder=embedder_name, branching=16, depth=2, em_steps=3, samples_per_step=2000
        ),
        embedder,
    )
    tree.save(directory)
    return time.perf_counter() - started


def bench_prepare(data: DataConfig, seq_len: int, workdir: str, embedder_name: str) -> dict:
    tree_dir = os.path.join(workdir, f"tree-{embedder_name}-{data.embedded_entities}")
    fit_seconds = 0.0
    if not os.path.isdir(tree_dir):
        fit_seconds = _fit_tree(data, embedder_name, tree_dir)
    out = os.path.join(workdir, f"prepared-{embedder_name}-{seq_len}")
    started = time.perf_counter()
    manifest = prepare_lib.prepare(data, seq_len, out, tree_dir=tree_dir, progress=False)
    seconds = time.perf_counter() - started
    return {
        "embedder": embedder_name,
        "seq_len": seq_len,
        "documents": manifest["num_documents"],
        "records": manifest["num_records"],
        "tokens": manifest["num_tokens"],
        "leaves": manifest["leaves"]["count"],
        "seconds": round(seconds, 2),
        "documents_per_s": round(manifest["num_documents"] / seconds),
        "stages_s": manifest["timing_s"],
        "tree_fit_s_not_included": round(fit_seconds, 2),
        "out": out,
    }


def bench_loader(prepared: str, seq_len: int, batch_size: int, steps: int) -> dict:
    loader = Loader(prepared, batch_size, seq_len, seed=0, worker_count=2, prefetch=4)
    loader.batch(0)  # open the shards
    started = time.perf_counter()
    for step in range(1, steps + 1):
        batch = loader.batch(step)
    serial = time.perf_counter() - started
    assert "block_ids_l2" in batch and "paths" in batch
    iterator = loader.iterate(start_step=steps + 1)
    next(iterator)
    started = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    prefetched = time.perf_counter() - started
    iterator.close()
    tokens = steps * batch_size * seq_len
    return {
        "seq_len": seq_len,
        "global_batch": batch_size,
        "steps": steps,
        "tokens_per_s_one_thread": round(tokens / serial),
        "tokens_per_s_iterate_2_threads": round(tokens / prefetched),
        "ms_per_step_one_thread": round(1000 * serial / steps, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entities", type=int, default=3000)
    parser.add_argument("--minilm_entities", type=int, default=300)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workdir", default="")
    args = parser.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_loader_")
    data = DataConfig(embedded_entities=args.entities, prepare_workers=2)
    results: dict = {
        "machine": _cpu_model(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "prepare": [],
        "loader": [],
    }
    results["prepare"].append(bench_prepare(data, 256, workdir, "hashed"))
    results["prepare"].append(bench_prepare(data, 2048, workdir, "hashed"))
    try:
        import sentence_transformers  # noqa: F401  (the `embed` extra)

        small = DataConfig(embedded_entities=args.minilm_entities, prepare_workers=2)
        results["prepare"].append(bench_prepare(small, 256, workdir, "minilm"))
    except ImportError:
        results["minilm"] = "not installed (pip install 'hmem_jax[embed]')"
    by_len = {p["seq_len"]: p["out"] for p in results["prepare"] if p["embedder"] == "hashed"}
    for seq_len, batch_size in ((256, 256), (2048, 64)):
        results["loader"].append(bench_loader(by_len[seq_len], seq_len, batch_size, args.steps))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
