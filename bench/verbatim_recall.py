"""Verbatim recall: does a run reproduce facts it was trained on, word for word?

    python bench/verbatim_recall.py --workdir=RUN [--mode=fetched|none] [--probe_file=FILE]

Takes the probes (default: the prepared data's `probes.jsonl`) whose prompt is, word for word,
the start of one of the training documents that state the answer, and generates from each
prompt with memory fetched by that document's route (mode 'fetched') or without memory
('none'). This separates "the model cannot memorise its training data" from "it cannot recall
a fact from a prompt worded unlike its training text": the contexts here are exactly the ones
the model was trained on. Prints accuracy (%) per frequency bucket.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from hmem_jax.infer import probe as probe_lib
from hmem_jax.infer.decode import Sampling
from hmem_jax.infer.engine import Engine
from hmem_jax.infer.run import load_run

_BATCH = 25


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--mode", default="fetched", choices=("fetched", "none"))
    parser.add_argument("--probe_file", default="")
    args = parser.parse_args()

    run = load_run(args.workdir)
    engine = Engine(run)
    mode = args.mode if engine.has_memory else "none"
    items = probe_lib.read_probe_file(
        args.probe_file or os.path.join(run.prepared_dir, "probes.jsonl")
    )
    documents = probe_lib.documents_by_id(run.cfg.data)
    chosen, routes = [], []
    for item in items:
        starts = [
            documents[d] for d in item.documents if documents[d].startswith(item.prompt + " ")
        ]
        if starts:
            chosen.append(item)
            routes.append(starts[0])
    if not chosen:
        raise SystemExit("No probe prompt starts a training document that states its answer.")
    block_ids = engine.block_ids(routes) if mode == "fetched" else None
    outputs: list[str] = []
    for start in range(0, len(chosen), _BATCH):
        outputs += engine.generate(
            [item.prompt for item in chosen[start : start + _BATCH]],
            mode,
            Sampling(max_new_tokens=6),
            batch_multiple=_BATCH,
            block_ids=None if block_ids is None else block_ids[start : start + _BATCH],
        )
    correct = np.array([item.is_correct(out) for item, out in zip(chosen, outputs)])
    buckets = np.array([item.bucket for item in chosen])
    print(f"{len(chosen)} probes whose prompt starts a training document; mode {mode}")
    for bucket in sorted(set(buckets.tolist())):
        where = buckets == bucket
        print(f"bucket {bucket}: {100 * correct[where].mean():5.1f}  (n={int(where.sum())})")
    print(f"all:      {100 * correct.mean():5.1f}")


if __name__ == "__main__":
    main()
