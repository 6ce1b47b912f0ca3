"""Balanced hierarchical k-means, built root to leaves (docs/method.md).

The tree has `depth` levels below the root and `branching` children per node,
so level l (1-based) has branching**l clusters (paper: 16 / 256 / 4,096 /
65,536). Level l's centroids are one array `[branching**l, D]`, grouped by
parent: the children of level-(l-1) cluster j are rows j*branching ...
j*branching + branching - 1.

Fitting one node (its documents are those routed to it by the levels above):

1. **k-means++ initialisation** on the node's first minibatch (D^2 sampling).
2. **Minibatch EM** for `em_steps` steps. Each step draws `samples_per_step`
   of the node's documents without replacement (all of them when the node has
   fewer, which makes the step an exact Lloyd iteration; such nodes stop early
   once the assignments no longer change), assigns each to its nearest centroid
   (L2), balances the assignments, and moves every centroid to the mean of its
   assigned samples. A centroid that received no sample keeps its position.
   Paper budget: 20 steps x 6,400 samples per node.
3. **Balancing rule** (the paper's): while some cluster holds more than
   `balance_threshold` (0.094 ~ 1.5/16) of the step's assignments, the
   members of the largest cluster and of the smallest cluster are pooled and
   split between the two at random, in halves. It stops when no cluster is
   above the threshold or when the largest and smallest differ by at most one
   member (then the threshold is below 1/branching of the sample and cannot be
   met). Each round strictly lowers the sum of squared cluster sizes, so it
   always terminates.

After a level is fitted, every document is routed to its nearest child, which
defines the nodes of the next level; the paths the tree gives at the end are
exactly those of `ClusterTree.route` (greedy descent).

**Nodes with too few documents.** A node's children must always exist (the
memory bank has a block for every cluster, and routing must be defined for
any query), so:

* a node with **no documents** gets `branching` copies of its own centroid;
* a node with **fewer distinct documents than `branching`** gets one child per
  distinct document (an exact, zero-inertia clustering, no EM), and the
  remaining children are copies of the node's own centroid.

Copies are exact duplicates; greedy descent breaks ties toward the lowest
child index, so a duplicate child receives a query only through its first
copy and a query routed into an empty subtree still gets a complete path.
The root's "own centroid" is the mean of all documents.

**Determinism.** Each node draws from its own generator seeded by
(seed, level, node index), so the tree depends only on the data and the seed,
not on the order nodes are visited.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable

import numpy as np

from hmem_jax.config import HierarchyConfig
from hmem_jax.hierarchy.routing import (
    descend_one_level,
    nearest_centroid,
    parallel_map,
    single_threaded_blas,
    squared_norms,
    validate_embeddings,
)


@dataclasses.dataclass
class LevelStats:
    """How fitting one level went: for the report and the benchmark."""

    level: int
    nodes: int
    seconds: float
    empty_nodes: int  # nodes without any document (children copied from the node)
    small_nodes: int  # nodes with fewer distinct documents than `branching`


def balance_assignments(
    assignment: np.ndarray, clusters: int, threshold: float, rng: np.random.Generator
) -> np.ndarray:
    """Apply the paper's balancing rule to `assignment` (int[M] in [0, clusters)), in place.

    While the largest cluster holds more than `threshold` of the M assignments
    and is at least two members bigger than the smallest, the two clusters'
    members are pooled, shuffled and split into halves (the larger half, if
    odd, stays with the formerly largest cluster). Returns `assignment`.
    """
    total = len(assignment)
    if total == 0:
        return assignment
    counts = np.bincount(assignment, minlength=clusters)
    limit = threshold * total
    # Termination is guaranteed (sum of squares decreases); the cap is a safety net.
    for _ in range(8 * clusters * clusters + 64):
        largest = int(np.argmax(counts))
        smallest = int(np.argmin(counts))
        if counts[largest] <= limit or counts[largest] - counts[smallest] <= 1:
            break
        members = np.flatnonzero((assignment == largest) | (assignment == smallest))
        shuffled = rng.permutation(members)
        to_smallest = len(members) // 2
        assignment[shuffled[:to_smallest]] = smallest
        assignment[shuffled[to_smallest:]] = largest
        counts[smallest] = to_smallest
        counts[largest] = len(members) - to_smallest
    return assignment


def kmeans_plus_plus(samples: np.ndarray, clusters: int, rng: np.random.Generator) -> np.ndarray:
    """Up to `clusters` initial centroids [K', D] by D^2 sampling, K' <= clusters.

    Returns fewer rows than asked when the samples have fewer distinct points
    (every remaining squared distance is zero); the caller fills the rest.
    """
    sample_norms = np.einsum("md,md->m", samples, samples)

    def squared_distances_to(index: int) -> np.ndarray:
        # ||x||^2 - 2 x.c + ||c||^2 with c = samples[index]; one matrix-vector product.
        distances = sample_norms - 2.0 * (samples @ samples[index]) + sample_norms[index]
        return np.maximum(distances, 0.0)  # the expansion can dip slightly below zero

    first = int(rng.integers(len(samples)))
    chosen = [first]
    nearest = squared_distances_to(first)
    while len(chosen) < clusters:
        cumulative = np.cumsum(nearest, dtype=np.float64)
        if not cumulative[-1] > 0:
            break
        pick = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
        pick = min(pick, len(samples) - 1)
        chosen.append(pick)
        nearest = np.minimum(nearest, squared_distances_to(pick))
    return samples[chosen].astype(np.float32)


def fit_node(
    embeddings: np.ndarray,
    rows: np.ndarray,
    own_centroid: np.ndarray,
    config: HierarchyConfig,
    rng: np.random.Generator,
) -> tuple[np.ndarray, str]:
    """Children centroids float32[branching, D] of one node holding `embeddings[rows]`.

    Returns the centroids and how the node was handled: 'empty', 'small' or 'em'.
    """
    k = config.branching
    if len(rows) == 0:
        return np.repeat(own_centroid[None, :], k, axis=0), "empty"
    batch = config.samples_per_step
    first_rows = rows if len(rows) <= batch else np.sort(rng.choice(rows, batch, replace=False))
    first_batch = embeddings[first_rows]
    initial = kmeans_plus_plus(first_batch, k, rng)
    if len(initial) < k:
        # Fewer distinct points than children: one child per point, the rest copy the node.
        # (k-means++ only stops early when every sample sits on a chosen point, and a node
        # this small fits in one batch, so `initial` holds all its distinct documents.)
        if len(rows) <= batch:
            padding = np.repeat(own_centroid[None, :], k - len(initial), axis=0)
            return np.concatenate([initial, padding]).astype(np.float32), "small"
        initial = np.concatenate([initial, np.repeat(own_centroid[None, :], k - len(initial), 0)])
    centroids = initial.astype(np.float32)
    whole_node_fits = len(rows) <= batch
    previous = None
    for step in range(config.em_steps):
        if step == 0 or whole_node_fits:
            samples = first_batch
        else:
            samples = embeddings[np.sort(rng.choice(rows, batch, replace=False))]
        assignment = nearest_centroid(samples, centroids)
        if whole_node_fits and previous is not None and np.array_equal(assignment, previous):
            break  # converged: the same assignment gives the same centroids (up to the
            # balancing rule's random split, which is as good a stopping point as any)
        previous = assignment.copy()
        balance_assignments(assignment, k, config.effective_balance_threshold, rng)
        counts = np.bincount(assignment, minlength=k)
        one_hot = (assignment[None, :] == np.arange(k)[:, None]).astype(np.float32)
        sums = one_hot @ samples
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids, "em"


def parallel_descend(
    embeddings: np.ndarray,
    cluster: np.ndarray,
    level_centroids: np.ndarray,
    branching: int,
    workers: int | None,
    chunk: int = 1 << 16,
) -> np.ndarray:
    """Child cluster ids int64[N] of one greedy step, computed in chunks on `workers` threads."""
    result = np.empty_like(cluster)
    norms = squared_norms(level_centroids)

    def descend_chunk(start: int) -> None:
        stop = start + chunk
        result[start:stop] = descend_one_level(
            embeddings[start:stop], cluster[start:stop], level_centroids, branching, norms
        )[1]

    parallel_map(descend_chunk, range(0, len(cluster), chunk), workers)
    return result


def fit_hierarchical_kmeans(
    embeddings: np.ndarray,
    config: HierarchyConfig,
    progress: Callable[[str], None] | None = None,
    workers: int | None = None,
) -> tuple[list[np.ndarray], list[LevelStats]]:
    """Centroids per level (level l: float32[branching**l, D]) fitted root to leaves.

    `embeddings` float32[N, D] must be finite and non-empty. Nodes of a level
    are fitted on `workers` threads (default: all cores); the result does not
    depend on it. `progress`, if given, receives one line per fitted level.
    """
    embeddings = validate_embeddings(embeddings, dim=None, allow_empty=False)
    k = config.branching
    count = len(embeddings)
    node_of_doc = np.zeros(count, np.int64)
    own_centroids = embeddings.mean(axis=0, dtype=np.float64)[None, :].astype(np.float32)
    levels: list[np.ndarray] = []
    stats: list[LevelStats] = []
    for level in range(1, config.depth + 1):
        start = time.perf_counter()
        nodes = k ** (level - 1)
        order = np.argsort(node_of_doc, kind="stable")
        bounds = np.searchsorted(node_of_doc[order], np.arange(nodes + 1))
        children = np.empty((nodes, k, embeddings.shape[1]), np.float32)

        def fit_one(node: int, level: int = level) -> str:
            rows = order[bounds[node] : bounds[node + 1]]
            rng = np.random.default_rng([config.seed, level, node])
            children[node], kind = fit_node(embeddings, rows, own_centroids[node], config, rng)
            return kind

        with single_threaded_blas():
            kinds = collections.Counter(parallel_map(fit_one, range(nodes), workers))
            level_centroids = children.reshape(nodes * k, -1)
            node_of_doc = parallel_descend(embeddings, node_of_doc, level_centroids, k, workers)
        own_centroids = level_centroids
        levels.append(level_centroids)
        stats.append(
            LevelStats(level, nodes, time.perf_counter() - start, kinds["empty"], kinds["small"])
        )
        if progress is not None:
            progress(
                f"level {level}: {nodes} nodes -> {nodes * k} clusters in "
                f"{stats[-1].seconds:.1f}s ({kinds['empty']} empty, {kinds['small']} small)"
            )
    return levels, stats
