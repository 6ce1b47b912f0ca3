"""A short, JSON-ready account of how a corpus falls into a cluster tree.

Per level: how many clusters are used, the cluster-size distribution (a
histogram and quantiles), balance, and inertia. Balance is reported two ways:
`max_fraction` is the largest cluster's share of all documents, and
`max_fraction_of_parent` is the largest share any child takes of its parent
node, which is what the paper's balancing rule bounds (0.094 of a node's
assignments during fitting; final nearest-centroid routes can exceed it).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hmem_jax.hierarchy.tree import ClusterTree


def size_histogram(sizes: np.ndarray, bins: int = 10) -> dict[str, list]:
    """Equal-width histogram of cluster sizes: bin edges and counts of clusters per bin."""
    top = max(int(sizes.max()), 1)
    counts, edges = np.histogram(sizes, bins=min(bins, top + 1), range=(0, top + 1))
    return {"edges": [int(np.floor(e)) for e in edges], "counts": counts.tolist()}


def cluster_report(tree: ClusterTree, embeddings: np.ndarray, paths: np.ndarray) -> dict[str, Any]:
    """Sizes, balance and inertia per level of `paths` (= tree.route(embeddings))."""
    ids = tree.block_ids(paths)
    inertia = tree.inertia_per_level(embeddings, paths)
    documents = len(paths)
    levels = []
    parent_sizes = np.array([documents])
    for level in range(tree.depth):
        clusters = tree.branching ** (level + 1)
        sizes = np.bincount(ids[:, level], minlength=clusters)
        per_parent = sizes.reshape(-1, tree.branching)
        populated = parent_sizes > 0
        share = per_parent[populated].max(axis=1) / parent_sizes[populated]
        levels.append(
            {
                "level": level + 1,
                "clusters": clusters,
                "non_empty": int((sizes > 0).sum()),
                "size_min": int(sizes.min()),
                "size_median": float(np.median(sizes)),
                "size_p90": float(np.quantile(sizes, 0.9)),
                "size_max": int(sizes.max()),
                "size_histogram": size_histogram(sizes),
                "max_fraction": float(sizes.max() / documents),
                "max_fraction_of_parent": float(share.max()),
                "mean_max_fraction_of_parent": float(share.mean()),
                "inertia": inertia[level],
            }
        )
        parent_sizes = sizes
    return {
        "documents": documents,
        "embedder": tree.embedder_name,
        "dim": tree.dim,
        "embedder_version": tree.embedder_version,
        "branching": tree.branching,
        "depth": tree.depth,
        "seed": tree.seed,
        "tree_hash": tree.content_hash,
        "levels": levels,
    }


def format_report(report: dict[str, Any]) -> str:
    """A few human-readable lines, one per level."""
    lines = [
        f"{report['documents']} documents, {report['embedder']} ({report['dim']}-d), "
        f"branching {report['branching']}, depth {report['depth']}, seed {report['seed']}"
    ]
    for level in report["levels"]:
        lines.append(
            f"  level {level['level']}: {level['non_empty']}/{level['clusters']} clusters used, "
            f"size min/median/p90/max {level['size_min']}/{level['size_median']:g}/"
            f"{level['size_p90']:g}/{level['size_max']}, max fraction {level['max_fraction']:.4f} "
            f"(of parent {level['max_fraction_of_parent']:.3f}), inertia {level['inertia']:.4f}"
        )
    return "\n".join(lines)
