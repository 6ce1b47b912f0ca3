"""Corpus preparation throughput: the in-process path against the Beam pipeline.

    python bench/bench_prepare.py [--entities=3000] [--embedder=hashed_idf|minilm] \
        [--workers=2] [--rounds=2]

Fits one tree on the embedded corpus, then prepares it with `prepare` (in-process) and with
`prepare_with_beam` on Beam's DirectRunner (`--workers` processes), alternately, `--rounds`
times each, every run into a new folder; prints documents/s of each (median) and their ratio
as a markdown table. Both include routing (embedding with the tree's embedder), tokenizing
with the same tokenizer (trained by each run on the corpus head) and writing the shards; the
Beam figure includes starting its workers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entities", type=int, default=3000)
    parser.add_argument("--embedder", default="hashed_idf")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from hmem_jax.data.beam_prepare import prepare_with_beam
    from hmem_jax.data.prepare import prepare
    from hmem_jax.hierarchy.corpus import cluster_corpus
    from hmem_jax.main.common import load_train_config

    cfg = load_train_config(
        (),
        (
            f"DataConfig.embedded_entities = {args.entities}",
            "DataConfig.vocab_size = 2048",
            "TrainConfig.seq_len = 128",
            f"HierarchyConfig.embedder = '{args.embedder}'",
            "HierarchyConfig.branching = 8",
            "HierarchyConfig.depth = 2",
        ),
    )
    beam_args = [
        "--runner=DirectRunner",
        f"--direct_num_workers={args.workers}",
        "--direct_running_mode=multi_processing",
    ]
    root = tempfile.mkdtemp(prefix="bench_prepare_")
    tree = os.path.join(root, "tree")
    cluster_corpus(cfg.data, cfg.hierarchy, tree, verbose=False)
    rates: dict[str, list[float]] = {"in-process": [], f"Beam DirectRunner x{args.workers}": []}
    documents = 0
    for round_number in range(args.rounds):
        for name in rates:
            out = os.path.join(root, f"{round_number}-{name.split()[0]}")
            start = time.perf_counter()
            if name == "in-process":
                manifest = prepare(cfg.data, cfg.seq_len, out, tree_dir=tree, progress=False)
            else:
                manifest = prepare_with_beam(cfg.data, cfg.seq_len, out, tree, beam_args)
            seconds = time.perf_counter() - start
            documents = manifest["num_documents"]
            rates[name].append(documents / seconds)
            print(f"{name}: {documents} documents in {seconds:.1f} s", flush=True)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next(
        (line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "?"
    )
    print(
        f"\n{documents:,} documents, embedder {args.embedder}, {os.cpu_count()} cores ({model})\n"
    )
    print(f"| path | documents/s (median of {args.rounds}) |")
    print("|---|---|")
    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name, value in medians.items():
        print(f"| {name} | {value:,.0f} |")
    first, second = medians.values()
    print(f"\nBeam / in-process: {second / first:.2f}")
    print(json.dumps({k: [round(v, 1) for v in vs] for k, vs in rates.items()}))


if __name__ == "__main__":
    main()
