"""The long-tail probe (PAPER.md §5): does memory store facts about rare entities?

Each probe is a prompt whose answer is an integer ("The atomic number of X
is"); the answer is the first integer in the greedy continuation, scored by
exact match, and probes are grouped into frequency buckets by how often the
entity is mentioned in the training data (bucket 0 = rarest). Conditions:
the anchor alone, anchor + generic memory, anchor + fetched memory (routed
from the prompt), fetched memory with the best-matching level-1 subtree
blocked (the prompt descends into the nearest other subtree instead), and the
retrieval baseline (nearest training document prepended, no memory).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from hmem_jax.infer.decode import Sampling
from hmem_jax.infer.engine import Engine

_INTEGER = re.compile(r"-?\d+")


def first_integer(text: str) -> str | None:
    match = _INTEGER.search(text)
    return match.group(0) if match else None


def _answers(engine: Engine, prompts: Sequence[str], mode: str, max_new_tokens: int,
             batch_size: int, blocked: np.ndarray | None = None,
             prefixes: Sequence[str] | None = None) -> list[str | None]:
    """First integer generated for each prompt; `blocked[i]`: level-1 cluster blocked for i."""
    out: list[str | None] = []
    sampling = Sampling(max_new_tokens=max_new_tokens)
    for start in range(0, len(prompts), batch_size):
        rows = slice(start, start + batch_size)
        texts = [(prefixes[i] if prefixes else "") + prompts[i]
                 for i in range(len(prompts))[rows]]
        generated = engine.generate(texts, mode, sampling, route_texts=list(prompts[rows]),
                                    blocked_level1=() if blocked is None else blocked[rows],
                                    batch_multiple=batch_size)
        out.extend(first_integer(text) for text in generated)
    return out


def accuracy_by_bucket(correct: np.ndarray, buckets: np.ndarray,
                       num_buckets: int) -> dict[str, Any]:
    per = [float(correct[buckets == b].mean()) if np.any(buckets == b) else None
           for b in range(num_buckets)]
    return {"per_bucket": per, "overall": float(correct.mean()),
            "n_per_bucket": [int(np.sum(buckets == b)) for b in range(num_buckets)]}


def run_probe(engine: Engine, probes: Sequence[Any], conditions: Sequence[str],
              rag: Callable[[Sequence[str]], list[str]] | None = None,
              max_new_tokens: int = 6, batch_size: int = 32) -> dict[str, Any]:
    """Accuracy per frequency bucket for each condition in
    {'anchor', 'generic', 'fetched', 'blocked', 'rag'}."""
    prompts = [p.prompt for p in probes]
    truth = np.array([p.answer for p in probes])
    buckets = np.array([p.bucket for p in probes])
    num_buckets = int(buckets.max()) + 1 if len(buckets) else 0
    results: dict[str, Any] = {}
    for condition in conditions:
        if condition == "anchor":
            got = _answers(engine, prompts, "none", max_new_tokens, batch_size)
        elif condition in ("generic", "fetched"):
            got = _answers(engine, prompts, condition, max_new_tokens, batch_size)
        elif condition == "blocked":
            own = engine.block_ids(prompts)[:, 0]
            got = _answers(engine, prompts, "fetched", max_new_tokens, batch_size, blocked=own)
        elif condition == "rag":
            if rag is None:
                raise ValueError("The 'rag' condition needs a retriever of training documents.")
            documents = rag(prompts)
            got = _answers(engine, prompts, "none", max_new_tokens, batch_size,
                           prefixes=[d + "\n\n" for d in documents])
        else:
            raise ValueError(f"Unknown probe condition {condition!r}.")
        correct = np.array([g is not None and g == t for g, t in zip(got, truth)])
        results[condition] = accuracy_by_bucket(correct, buckets, num_buckets)
    return results


def format_probe_table(results: dict[str, Any]) -> str:
    """A fixed-width table: one row per condition, accuracy (%) per bucket and overall."""
    if not results:
        return "(no probe results)"
    buckets = len(next(iter(results.values()))["per_bucket"])
    header = f"{'condition':<10}" + "".join(f"{'b' + str(b):>8}" for b in range(buckets))
    lines = [header + f"{'all':>8}"]
    for name, row in results.items():
        cells = "".join(f"{'-' if v is None else f'{100 * v:.1f}':>8}" for v in row["per_bucket"])
        lines.append(f"{name:<10}{cells}{100 * row['overall']:>8.1f}")
    counts = next(iter(results.values()))["n_per_bucket"]
    lines.append(f"{'n':<10}" + "".join(f"{n:>8}" for n in counts) + f"{sum(counts):>8}")
    return "\n".join(lines)


def probe_workdir(workdir: str, limit: int | None = None,
                  conditions: Sequence[str] = ("anchor", "generic", "fetched", "blocked")
                  ) -> dict[str, Any] | None:
    """The probe table of a run folder's latest checkpoint (None without probes.jsonl).

    What the train entry point calls after training to print the per-bucket table.
    """
    import os
    import random

    from hmem_jax.data.encyclopedia import read_probes
    from hmem_jax.infer.run import load_run

    run = load_run(workdir)
    path = os.path.join(run.prepared_dir, "probes.jsonl")
    if not os.path.isfile(path):
        return None
    engine = Engine(run)
    probes = read_probes(path)
    if limit:
        probes = random.Random(0).sample(probes, min(limit, len(probes)))
    usable = [c for c in conditions if engine.has_memory or c == "anchor"]
    usable = [c for c in usable if c != "generic" or engine.has_generic]
    return run_probe(engine, probes, usable)
