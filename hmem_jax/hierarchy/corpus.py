"""Fit a ClusterTree on a corpus: read, embed (cached), fit, route, report.

What `python -m hmem_jax.main.cluster` and a memory run's first start (which
fits WORKDIR/tree) both do. Writes into `out_dir`, which is then a tree folder
(`ClusterTree.load(out_dir)`): the tree, `paths.npy` (int32[N, depth], the
route of each document the tree was fitted on), `doc_ids.json` (those N
document ids, in that order), `report.json` and the gin configuration used.

With `HierarchyConfig.fit_sample = S` the tree is fitted on a uniform sample
of at most S documents drawn while the corpus streams past
(`reservoir_sample`): reading holds S documents, not the corpus, and only the
sample is embedded. `prepare` routes every document afterwards either way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import gin
import numpy as np

from hmem_jax import paths as hmem_paths
from hmem_jax.config import DataConfig, HierarchyConfig
from hmem_jax.data.document import Document
from hmem_jax.errors import SourceError


def reservoir_sample(
    documents: Iterable[Document], size: int, seed: int, block: int = 4096
) -> tuple[list[Document], int]:
    """A uniform sample of at most `size` of `documents`, drawn in one pass holding at most
    `size` of them (reservoir sampling, Vitter's algorithm R), returned in corpus order, and
    how many documents there were. Deterministic in `seed`; with no more than `size`
    documents the sample is all of them, so the fit is the fit on the whole corpus."""
    rng = np.random.default_rng([seed, 0x5A17])
    kept: list[tuple[int, Document]] = []
    draws, used = rng.random(block), 0
    count = 0
    for count, document in enumerate(documents, start=1):
        if count <= size:
            kept.append((count - 1, document))
            continue
        if used == block:
            draws, used = rng.random(block), 0
        slot = int(draws[used] * count)  # uniform in [0, count): keep with chance size/count
        used += 1
        if slot < size:
            kept[slot] = (count - 1, document)
    kept.sort(key=lambda item: item[0])
    return [document for _, document in kept], count


def cluster_corpus(
    data: DataConfig,
    hierarchy: HierarchyConfig,
    out_dir: str | os.PathLike,
    cache_dir: str | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Read, embed (cached), fit, route and report; returns the report written to report.json."""
    from hmem_jax.data.sources import SourceStats, read_documents
    from hmem_jax.hierarchy import ClusterTree, cluster_report, embed_cached, format_report
    from hmem_jax.hierarchy.cache import corpus_hash
    from hmem_jax.hierarchy.embedders import fit_embedder, get_embedder
    from hmem_jax.hierarchy.tree import MANIFEST_NAME

    say = print if verbose else (lambda *_: None)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    stats = SourceStats()
    stream = read_documents(data, stats)
    if hierarchy.fit_sample:
        documents, seen = reservoir_sample(stream, hierarchy.fit_sample, hierarchy.seed)
    else:
        documents = list(stream)
        seen = len(documents)
    timings["read_s"] = time.perf_counter() - started
    if not documents:
        raise SourceError(
            f"The corpus ({data.source} {data.path!r}) has no documents; nothing to "
            "cluster. Check --docs (jsonl lines need a non-empty 'text' field)."
        )
    texts = [document.text for document in documents]
    say(
        f"read {seen} documents from {data.source} {data.path!r}"
        + (f", fitting on a sample of {len(texts)}" if len(texts) < seen else "")
        + (f" (repairs: {stats.problems()})" if stats.problems() else "")
    )

    options = {"show_progress": verbose} if hierarchy.embedder == "minilm" else {}
    embedder = get_embedder(hierarchy.embedder, state=None, **options)
    started = time.perf_counter()
    fit_embedder(embedder, texts)  # corpus statistics first (hashed_idf): they key the cache
    embeddings = embed_cached(embedder, texts, cache_dir or None)
    timings["embed_s"] = time.perf_counter() - started
    say(f"embedded with {embedder.name} ({embedder.dim}-d) in {timings['embed_s']:.1f}s")

    started = time.perf_counter()
    corpus = corpus_hash(texts)
    tree = ClusterTree.fit(
        embeddings,
        hierarchy,
        embedder,
        progress=say,
        fit_info={
            "corpus_hash": corpus,
            "source": data.source,
            "path": data.path,
            "documents_read": seen,
            "documents_fitted": len(texts),
        },
    )
    timings["fit_s"] = time.perf_counter() - started
    started = time.perf_counter()
    paths = tree.route(embeddings)
    timings["route_s"] = time.perf_counter() - started

    with hmem_paths.staged(str(out_dir), last=(MANIFEST_NAME,)) as local:  # URL: uploaded after
        out = Path(local)
        out.mkdir(parents=True, exist_ok=True)
        tree.save(out)
        np.save(out / "paths.npy", paths)
        (out / "doc_ids.json").write_text(json.dumps([document.id for document in documents]))
        (out / "config.gin").write_text(gin.config_str())
        report = cluster_report(tree, embeddings, paths)
        report.update(
            corpus_hash=corpus,
            source=stats.as_dict(),
            documents_read=seen,
            timings_s={k: round(v, 3) for k, v in timings.items()},
            hierarchy={
                **dataclasses.asdict(hierarchy),
                "balance_threshold_used": tree.fit_info["balance_threshold"],
            },
        )
        (out / "report.json").write_text(json.dumps(report, indent=1))
        say(format_report(report))
        say(
            f"wrote the tree, paths.npy, doc_ids.json and report.json to {out_dir} "
            f"(tree {tree.content_hash[:12]})"
        )
    return report
