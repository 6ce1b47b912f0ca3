"""Long-tail probes (docs/method.md): does fetched memory carry facts about rare entities?

A probe is a prompt with accepted answers and a frequency bucket (0 = the
rarest entities); `documents` optionally names the training documents that
state the answer. Answers are matched three ways (`ProbeItem.match`):
'integer' (the first integer generated is one of the answers, the paper's
atomic-number rule), 'prefix' (the stripped continuation starts with one of
the answers). A probe file is jsonl, one object per line:

    {"prompt": "The atomic number of Xenon is", "answer": 54, "bucket": 2,
     "documents": ["doc-17", "doc-902"]}

`answer` may be a list of accepted answers; `match` may be given, otherwise
it is 'integer' when every answer is an integer and 'prefix' otherwise.

Conditions, each a row of the per-bucket table: the anchor alone, anchor +
generic memory, anchor + fetched memory (routed from the prompt), fetched
with the prompt's best level-1 subtree blocked (the prompt descends into
the nearest other subtree), the oracle route (memory fetched by the path of
the documents that state the fact: it separates "the memory did not learn
the fact" from "routing did not find it"), and the retrieval baseline
(nearest training document prepended, no memory).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from hmem_jax import paths
from hmem_jax.errors import ConfigError, ProbeFileError
from hmem_jax.infer.decode import Sampling
from hmem_jax.infer.engine import Engine

PROBE_CONDITIONS = ("anchor", "generic", "fetched", "blocked", "oracle", "rag")
MATCH_KINDS = ("integer", "prefix")
_INTEGER = re.compile(r"-?\d+")


@dataclasses.dataclass(frozen=True)
class ProbeItem:
    prompt: str
    answers: tuple[str, ...]
    bucket: int = 0
    match: str = "integer"
    documents: tuple[str, ...] = ()  # ids of training documents that state the answer

    def is_correct(self, generated: str) -> bool:
        if self.match == "integer":
            return first_integer(generated) in self.answers
        text = generated.strip()
        return any(text.startswith(answer) for answer in self.answers)


def first_integer(text: str) -> str | None:
    match = _INTEGER.search(text)
    return match.group(0) if match else None


def probe_item(row: Mapping[str, Any], where: str = "probe") -> ProbeItem:
    """A ProbeItem from a probe file row (or any mapping with the same fields)."""
    if not isinstance(row, Mapping) or "prompt" not in row or "answer" not in row:
        raise ProbeFileError(
            f"{where}: expected an object with 'prompt' and 'answer' "
            "(optionally 'bucket', 'documents', 'match')."
        )
    raw = row["answer"]
    answers = tuple(str(a).strip() for a in (raw if isinstance(raw, (list, tuple)) else [raw]))
    if not answers or not all(answers):
        raise ProbeFileError(f"{where}: 'answer' must be a non-empty string, number or list.")
    match = row.get("match") or (
        "integer" if all(_INTEGER.fullmatch(a) for a in answers) else "prefix"
    )
    if match not in MATCH_KINDS:
        raise ProbeFileError(f"{where}: 'match' = {match!r} is not one of {MATCH_KINDS}.")
    bucket = row.get("bucket", 0)
    if not isinstance(bucket, int) or bucket < 0:
        raise ProbeFileError(f"{where}: 'bucket' must be an integer >= 0, got {bucket!r}.")
    documents = row.get("documents") or ()
    return ProbeItem(
        prompt=str(row["prompt"]),
        answers=answers,
        bucket=bucket,
        match=match,
        documents=tuple(str(d) for d in documents),
    )


def read_probe_file(path: str) -> list[ProbeItem]:
    """Probe items of a jsonl file (the format in this module's docstring)."""
    if not paths.isfile(path):
        raise ProbeFileError(
            f"The probe file {path!r} does not exist; pass a jsonl file with "
            "one {'prompt', 'answer', 'bucket'} object per line."
        )
    items = []
    with paths.open_file(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ProbeFileError(f"{path}:{number}: not JSON ({error.msg}).") from None
            items.append(probe_item(row, f"{path}:{number}"))
    if not items:
        raise ProbeFileError(f"The probe file {path!r} has no probes.")
    return items


def sample_probes(items: Sequence[ProbeItem], limit: int) -> list[ProbeItem]:
    """`limit` probes drawn with a fixed seed (all of them when limit is 0 or larger)."""
    if not limit:
        return list(items)
    return random.Random(0).sample(list(items), min(limit, len(items)))


def documents_by_id(data: Any) -> dict[str, str]:
    """id -> text of every training document of a DataConfig (what 'oracle' routes by)."""
    from hmem_jax.data.sources import read_documents

    return {doc.id: doc.text for doc in read_documents(data)}


def _generate(
    engine: Engine,
    prompts: Sequence[str],
    mode: str,
    sampling: Sampling,
    batch_size: int,
    routes: np.ndarray | None = None,
    blocked: np.ndarray | None = None,
    prefixes: Sequence[str] | None = None,
) -> list[str]:
    """Greedy continuations; memory by the prompt's route, or by `routes[i]` (block ids)."""
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        rows = slice(start, start + batch_size)
        texts = [(prefixes[i] if prefixes else "") + prompts[i] for i in range(len(prompts))[rows]]
        out.extend(
            engine.generate(
                texts,
                mode,
                sampling,
                route_texts=list(prompts[rows]),
                blocked_level1=() if blocked is None else blocked[rows],
                block_ids=None if routes is None else routes[rows],
                batch_multiple=batch_size,
            )
        )
    return out


def accuracy_by_bucket(
    correct: np.ndarray, buckets: np.ndarray, num_buckets: int
) -> dict[str, Any]:
    per = [
        float(correct[buckets == b].mean()) if np.any(buckets == b) else None
        for b in range(num_buckets)
    ]
    return {
        "per_bucket": per,
        "overall": float(correct.mean()) if len(correct) else 0.0,
        "n_per_bucket": [int(np.sum(buckets == b)) for b in range(num_buckets)],
    }


def _fact_document_routes(
    engine: Engine, items: Sequence[ProbeItem], documents: Mapping[str, str]
) -> list[tuple[int, np.ndarray]]:
    """(probe index, block ids int32[depth]) for every known document that states an answer."""
    texts, owners = [], []
    for i, item in enumerate(items):
        for doc in item.documents:
            if doc in documents:
                texts.append(documents[doc])
                owners.append(i)
    return list(zip(owners, engine.block_ids(texts))) if texts else []


def oracle_block_ids(
    engine: Engine, items: Sequence[ProbeItem], documents: Mapping[str, str]
) -> tuple[np.ndarray, np.ndarray]:
    """(block ids int32[N, depth], has_route bool[N]): per probe, the path most of the
    documents stating its answer were routed to (ties: the first such document's)."""
    routes = np.zeros((len(items), engine.run.tree.depth), np.int32)
    has = np.zeros(len(items), bool)
    per_item: dict[int, list[tuple[int, ...]]] = collections.defaultdict(list)
    for owner, row in _fact_document_routes(engine, items, documents):
        per_item[owner].append(tuple(int(x) for x in row))
    for i, found in per_item.items():
        routes[i] = collections.Counter(found).most_common(1)[0][0]
        has[i] = True
    return routes, has


def routing_agreement(
    engine: Engine, items: Sequence[ProbeItem], documents: Mapping[str, str]
) -> dict[str, Any]:
    """Per level: the share of probes whose prompt is routed into a cluster holding at least
    one document that states the answer (probes without known documents are left out)."""
    depth = engine.run.tree.depth
    prompt_ids = engine.block_ids([item.prompt for item in items])
    hits = np.zeros((len(items), depth), bool)
    known = np.zeros(len(items), bool)
    for owner, row in _fact_document_routes(engine, items, documents):
        known[owner] = True
        hits[owner] |= row == prompt_ids[owner]
    buckets = np.array([item.bucket for item in items])
    num_buckets = int(buckets.max()) + 1 if len(items) else 0
    per_level = [
        accuracy_by_bucket(hits[known, level], buckets[known], num_buckets)
        for level in range(depth)
    ]
    tree = engine.run.tree
    clusters = [tree.branching ** (level + 1) for level in range(depth)]
    return {"levels": per_level, "probes": int(known.sum()), "random": [1.0 / c for c in clusters]}


def run_probe(
    engine: Engine,
    items: Sequence[ProbeItem],
    conditions: Sequence[str],
    rag: Callable[[Sequence[str]], list[str]] | None = None,
    documents: Mapping[str, str] | None = None,
    max_new_tokens: int = 8,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Accuracy per frequency bucket for each condition of PROBE_CONDITIONS.

    'oracle' needs `documents` (id -> text of the training documents); its
    row counts only the probes with at least one known document.
    """
    prompts = [item.prompt for item in items]
    buckets = np.array([item.bucket for item in items])
    num_buckets = int(buckets.max()) + 1 if len(items) else 0
    sampling = Sampling(max_new_tokens=max_new_tokens)
    results: dict[str, Any] = {}
    for condition in conditions:
        keep = np.ones(len(items), bool)
        if condition == "anchor":
            got = _generate(engine, prompts, "none", sampling, batch_size)
        elif condition in ("generic", "fetched"):
            got = _generate(engine, prompts, condition, sampling, batch_size)
        elif condition == "blocked":
            own = engine.block_ids(prompts)[:, 0]
            got = _generate(engine, prompts, "fetched", sampling, batch_size, blocked=own)
        elif condition == "oracle":
            if documents is None:
                raise ValueError("The 'oracle' condition needs the training documents.")
            routes, keep = oracle_block_ids(engine, items, documents)
            got = _generate(engine, prompts, "fetched", sampling, batch_size, routes=routes)
        elif condition == "rag":
            if rag is None:
                raise ValueError("The 'rag' condition needs a retriever of training documents.")
            prefixes = [d + "\n\n" for d in rag(prompts)]
            got = _generate(engine, prompts, "none", sampling, batch_size, prefixes=prefixes)
        else:
            raise ConfigError(
                f"Unknown probe condition {condition!r}; choose from {PROBE_CONDITIONS}."
            )
        correct = np.array([item.is_correct(text) for item, text in zip(items, got)], bool)
        results[condition] = accuracy_by_bucket(correct[keep], buckets[keep], num_buckets)
    return results


def format_probe_table(results: Mapping[str, Any], label: str = "condition") -> str:
    """A fixed-width table: one row per condition, accuracy (%) per bucket and overall."""
    if not results:
        return "(no probe results)"
    buckets = len(next(iter(results.values()))["per_bucket"])
    width = max([len(label)] + [len(name) for name in results]) + 2
    header = f"{label:<{width}}" + "".join(f"{'b' + str(b):>8}" for b in range(buckets))
    lines = [header + f"{'all':>8}"]
    for name, row in results.items():
        cells = "".join(f"{'-' if v is None else f'{100 * v:.1f}':>8}" for v in row["per_bucket"])
        lines.append(f"{name:<{width}}{cells}{100 * row['overall']:>8.1f}")
    counts = next(iter(results.values()))["n_per_bucket"]
    lines.append(f"{'n':<{width}}" + "".join(f"{n:>8}" for n in counts) + f"{sum(counts):>8}")
    return "\n".join(lines)


def format_routing_table(agreement: Mapping[str, Any]) -> str:
    """Routing agreement per level and bucket (%), with the random-routing share."""
    rows = {f"level {i + 1}": row for i, row in enumerate(agreement["levels"])}
    table = format_probe_table(rows, label="prompt in a fact document's cluster")
    chance = ", ".join(f"level {i + 1} {100 * r:.2g}%" for i, r in enumerate(agreement["random"]))
    return f"{table}\n(random routing: {chance})"


def compare_runs(
    engines: Mapping[str, Engine],
    items: Sequence[ProbeItem],
    conditions: Sequence[str] = ("anchor", "generic", "fetched", "blocked", "oracle"),
    documents: Mapping[str, str] | None = None,
    rag: Callable[[Sequence[str]], list[str]] | None = None,
) -> dict[str, Any]:
    """One probe table over several runs: rows '<run>: <condition>'.

    Each run gets the conditions it supports (an anchor-only run: 'anchor'
    and 'rag'; 'generic' needs a generic memory; 'oracle' needs documents).
    """
    rows: dict[str, Any] = {}
    for name, engine in engines.items():
        usable = [c for c in conditions if c in ("anchor", "rag") or engine.has_memory]
        usable = [c for c in usable if c != "generic" or engine.has_generic]
        usable = [c for c in usable if c != "oracle" or documents is not None]
        usable = [c for c in usable if c != "rag" or rag is not None]
        for condition, row in run_probe(engine, items, usable, rag, documents).items():
            rows[f"{name}: {condition}"] = row
    return rows


def probe_workdir(
    workdir: str,
    limit: int = 0,
    conditions: Sequence[str] = ("anchor", "generic", "fetched", "blocked", "oracle"),
) -> dict[str, Any] | None:
    """The probe table of a run folder's latest checkpoint on its prepared data's probes
    (None when the data has no probes.jsonl); what `train` prints after training."""
    from hmem_jax.infer.run import load_run

    run = load_run(workdir)
    path = os.path.join(run.prepared_dir, "probes.jsonl")
    if not os.path.isfile(path):
        return None
    items = sample_probes(read_probe_file(path), limit)
    documents = None
    if "oracle" in conditions and any(item.documents for item in items):
        documents = documents_by_id(run.cfg.data)
    rows = compare_runs({"run": Engine(run)}, items, conditions, documents)
    return {name[len("run: ") :]: row for name, row in rows.items()}


def element_probes(prepared_dir: str) -> list[ProbeItem]:
    """The paper's atomic-number probe: all 118 elements, bucketed (0 = rarest, 5 buckets)
    by how often the run's own training corpus names them (counted by `prepare`)."""
    from hmem_jax.data import elements

    counts = elements.read_counts(prepared_dir)
    if counts is None:
        raise ProbeFileError(
            f"{prepared_dir!r} has no {elements.COUNTS_FILE}: it was prepared "
            "before element names were counted. Prepare the data again to "
            "bucket the element probe by this corpus."
        )
    buckets = elements.frequency_buckets(counts)
    return [
        ProbeItem(
            prompt=f"The atomic number of {name} is", answers=(str(number),), bucket=buckets[name]
        )
        for number, name, _ in elements.ELEMENTS
    ]
