"""Greedy nearest-centroid descent through a centroid tree (docs/method.md).

At each level a document only compares itself with the `branching` children
of the cluster it is in, so the work per document is depth x branching dot
products, not the number of leaves. Documents are grouped by their current
cluster and each group is scored with one small matrix product, which keeps
the descent vectorised without materialising per-document centroid copies.

L2 distance is what the paper uses; since ||x||^2 is the same for all of a
document's candidates, the argmin of ||c||^2 - 2 x.c gives the same child.
Ties go to the lowest child index (numpy's argmin), which is what makes
duplicated children of under-populated nodes harmless.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

from hmem_jax.errors import TreeError

T = TypeVar("T")
R = TypeVar("R")

# Below this many rows routing runs inline: BLAS uses one thread for such small products anyway.
SMALL_ROUTING_ROWS = 4096


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Limit BLAS to one thread inside the block (restored after), if threadpoolctl is present.

    The products here are small ([6400, 384] x [384, 16] at most). A
    multi-threaded BLAS spends more on waking threads than it saves, and
    under CPU contention it was 4-10x slower than one thread on the 2-core
    machine (BENCHMARKS.md). Parallelism comes from `parallel_map` over
    independent nodes or batches instead.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: without it, BLAS keeps its own thread count
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def parallel_map(
    function: Callable[[T], R], items: Iterable[T], workers: int | None = None
) -> list[R]:
    """`[function(item) for item in items]` on `workers` threads (numpy releases the GIL).

    Results come back in item order, so callers stay deterministic as long as
    `function` only depends on its item.
    """
    items = list(items)
    workers = available_cores() if workers is None else workers
    if workers <= 1 or len(items) <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        return list(pool.map(function, items))


def validate_embeddings(
    embeddings: np.ndarray, dim: int | None, allow_empty: bool, what: str = "embeddings"
) -> np.ndarray:
    """`embeddings` as C-contiguous float32[N, D], or an error saying what is wrong: a ValueError
    for an array that is not a float matrix, a TreeError for data that does not fit the tree."""
    array = np.asarray(embeddings)
    if array.ndim != 2:
        raise ValueError(
            f"{what} must be a 2-D array [documents, dim]; got shape {array.shape}. "
            "Embed a list of texts, or reshape a single vector with x[None, :]."
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"{what} must be floating point; got dtype {array.dtype}.")
    if dim is not None and array.shape[1] != dim:
        raise TreeError(
            f"{what} have dimension {array.shape[1]} but the cluster tree expects "
            f"{dim}; embed with the embedder the tree was fitted with."
        )
    if array.shape[0] == 0 and not allow_empty:
        raise TreeError(
            f"{what} are empty (0 documents); a cluster tree needs at least one "
            "document. Check that the corpus path is right and not empty."
        )
    array = np.ascontiguousarray(array, dtype=np.float32)
    # min/max propagate NaN and expose infinities, and are much cheaper than isfinite(array).
    if array.size and not (np.isfinite(array.min()) and np.isfinite(array.max())):
        bad = np.flatnonzero(~np.isfinite(array).all(axis=1))
        raise TreeError(
            f"{what} contain NaN or infinite values in {len(bad)} rows (first: "
            f"{bad[:5].tolist()}); fix or drop those documents before clustering."
        )
    return array


def squared_norms(centroids: np.ndarray) -> np.ndarray:
    """float32[K] = ||c_k||^2, precomputed once per level."""
    return np.einsum("kd,kd->k", centroids, centroids)


def nearest_centroid(
    points: np.ndarray, centroids: np.ndarray, centroid_norms: np.ndarray | None = None
) -> np.ndarray:
    """int64[M]: index of the nearest of `centroids` [K, D] (L2) for each of `points` [M, D]."""
    if centroid_norms is None:
        centroid_norms = squared_norms(centroids)
    return np.argmin(centroid_norms[None, :] - 2.0 * (points @ centroids.T), axis=1)


def descend_one_level(
    embeddings: np.ndarray,
    cluster: np.ndarray,
    level_centroids: np.ndarray,
    branching: int,
    level_norms: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One greedy step: (child index int64[N] in [0, branching), child cluster id int64[N]).

    `cluster` int64[N] is each document's cluster at the level above (all 0 at
    the root); `level_centroids` [parents * branching, D] are grouped by parent.
    """
    if level_norms is None:
        level_norms = squared_norms(level_centroids)
    child = np.empty(len(embeddings), np.int64)
    if len(level_centroids) == branching:
        child[:] = nearest_centroid(embeddings, level_centroids, level_norms)
        return child, cluster * branching + child
    order = np.argsort(cluster, kind="stable")
    sorted_cluster = cluster[order]
    group_starts = np.flatnonzero(np.diff(sorted_cluster, prepend=-1))
    group_ends = np.append(group_starts[1:], len(order))
    for start, end in zip(group_starts.tolist(), group_ends.tolist()):
        rows = order[start:end]
        first = int(sorted_cluster[start]) * branching
        child[rows] = nearest_centroid(
            embeddings[rows],
            level_centroids[first : first + branching],
            level_norms[first : first + branching],
        )
    return child, cluster * branching + child


def greedy_paths(
    embeddings: np.ndarray,
    levels: Sequence[np.ndarray],
    branching: int,
    level_norms: Sequence[np.ndarray] | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
) -> np.ndarray:
    """int32[N, depth] child index per level, by greedy descent.

    Batches of `batch_size` rows are routed independently on `workers`
    threads (default: all cores); the result does not depend on either. Big
    batches matter: deep levels group a batch by cluster, and a batch of
    2^18 rows still averages only 64 documents per level-3 cluster of a 16x4
    tree. The default splits N evenly over the workers, at most 2^19 rows.
    """
    workers = available_cores() if workers is None else workers
    if batch_size is None:
        batch_size = min(1 << 19, max(1024, -(-len(embeddings) // workers)))
    if level_norms is None:
        level_norms = [squared_norms(c) for c in levels]
    paths = np.empty((len(embeddings), len(levels)), np.int32)

    def route_batch(start: int) -> None:
        batch = embeddings[start : start + batch_size]
        cluster = np.zeros(len(batch), np.int64)
        for depth_index, (centroids, norms) in enumerate(zip(levels, level_norms)):
            child, cluster = descend_one_level(batch, cluster, centroids, branching, norms)
            paths[start : start + len(batch), depth_index] = child

    starts = range(0, len(embeddings), batch_size)
    if len(embeddings) < SMALL_ROUTING_ROWS:  # a prompt: skip the thread-limit set-up (~0.6 ms)
        for start in starts:
            route_batch(start)
        return paths
    with single_threaded_blas():
        parallel_map(route_batch, starts, workers)
    return paths


def block_ids_from_paths(paths: np.ndarray, branching: int) -> np.ndarray:
    """int32[N, depth] global cluster id per level: id_l = id_{l-1} * branching + child_l.

    Level 1 ids lie in [0, branching), level 2 in [0, branching^2), and so on;
    these index the rows of each level's centroids and the memory bank's blocks.
    """
    paths = np.asarray(paths)
    if paths.ndim != 2:
        raise ValueError(f"paths must be int[N, depth]; got shape {paths.shape}.")
    if paths.size and (paths.min() < 0 or paths.max() >= branching):
        raise ValueError(
            f"path entries must lie in [0, {branching}); found range "
            f"[{paths.min()}, {paths.max()}]. Were these paths made by another tree?"
        )
    ids = np.empty(paths.shape, np.int64)
    running = np.zeros(len(paths), np.int64)
    for level in range(paths.shape[1]):
        running = running * branching + paths[:, level]
        ids[:, level] = running
    if ids.size and ids.max() > np.iinfo(np.int32).max:
        raise ValueError(
            f"block ids up to {ids.max()} overflow int32 (branching {branching}, "
            f"depth {paths.shape[1]}); use a smaller tree."
        )
    return ids.astype(np.int32)
