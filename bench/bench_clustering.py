"""Benchmark clustering and routing: fit a 16x4 tree, route, compare with faiss, embed.

    python bench/bench_clustering.py [--docs=1000000] [--dim=384] [--out=results.json]

1. Fit a balanced hierarchical k-means tree (HierarchyConfig defaults: 16 x 4,
   20 EM steps x 6,400 samples per node) on `--docs` random unit vectors and
   route them all (goals on the 2-core CPU: fit <= 5 minutes, >= 50,000 docs/s).
2. The same hierarchy fitted with faiss-cpu k-means per node at the same sample
   budget (`max_points_per_centroid` = 6,400 / 16 = 400, 20 iterations), with
   the same rule for nodes that have fewer documents than children; both
   trees' inertia per level is measured with the same greedy routing.
3. One minibatch EM step in numpy vs jax.jit (to decide whether JAX pays on CPU).
4. Embedding throughput of the 'hashed' and (when installed) 'minilm' embedders
   on the embedded encyclopedia's documents.
5. Routing quality on the embedded encyclopedia: how much of an entity's
   documents share the cluster its probe prompt ("The atomic number of X is")
   is routed to, per level of a 16 x 2 tree, hashed vs hashed_idf vs MiniLM
   (and how much of the documents that state its answer do).

Prints a JSON object (also written to `--out`); BENCHMARKS.md "## Clustering
and routing" quotes it. CPU contention from other processes slows everything:
the load average at start is recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import sys
import time

import numpy as np

from hmem_jax.config import DataConfig, HierarchyConfig
from hmem_jax.hierarchy import ClusterTree, get_embedder
from hmem_jax.hierarchy.routing import nearest_centroid


def cpu_model() -> str:
    """The CPU model name (what `lscpu` prints as "Model name"), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [
                line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")
            ]
        return names[0] if names else platform.processor() or "unknown"
    except OSError:
        return platform.processor() or "unknown"


def random_unit_vectors(count: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = np.empty((count, dim), np.float32)
    for start in range(0, count, 1 << 17):
        chunk = rng.standard_normal((min(1 << 17, count - start), dim), dtype=np.float32)
        vectors[start : start + len(chunk)] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return vectors


def bench_ours(vectors: np.ndarray, config: HierarchyConfig) -> tuple[dict, ClusterTree]:
    started = time.perf_counter()
    tree = ClusterTree.fit(vectors, config, "random", progress=lambda line: print(line, flush=True))
    fit_seconds = time.perf_counter() - started
    routing = {}
    for workers in (1, None):
        started = time.perf_counter()
        paths = tree.route(vectors, workers=workers)
        seconds = time.perf_counter() - started
        routing["all_cores" if workers is None else f"{workers}_thread"] = {
            "seconds": round(seconds, 2),
            "docs_per_s": round(len(vectors) / seconds),
        }
    inertia = tree.inertia_per_level(vectors, paths)
    sizes = [
        np.bincount(ids, minlength=n) for ids, n in zip(tree.block_ids(paths).T, tree.num_clusters)
    ]
    return {
        "fit_seconds": round(fit_seconds, 1),
        "fit_seconds_per_level": [round(s["seconds"], 1) for s in tree.fit_info["levels"]],
        "small_or_empty_nodes_per_level": [
            s["small_nodes"] + s["empty_nodes"] for s in tree.fit_info["levels"]
        ],
        "routing": routing,
        "inertia_per_level": [round(v, 5) for v in inertia],
        "max_cluster_fraction_per_level": [round(float(s.max() / len(vectors)), 5) for s in sizes],
    }, tree


@contextlib.contextmanager
def quiet_stderr():
    """Silence C++ warnings (faiss prints one per node with < 39 points per centroid)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def fit_faiss_hierarchy(vectors: np.ndarray, config: HierarchyConfig) -> tuple[list, list]:
    """The same root-to-leaves hierarchy with faiss k-means per node; returns (levels, seconds)."""
    import faiss

    k, dim = config.branching, vectors.shape[1]
    node_of_doc = np.zeros(len(vectors), np.int64)
    own = vectors.mean(axis=0, keepdims=True)
    levels, seconds = [], []
    for level in range(1, config.depth + 1):
        started = time.perf_counter()
        nodes = k ** (level - 1)
        order = np.argsort(node_of_doc, kind="stable")
        bounds = np.searchsorted(node_of_doc[order], np.arange(nodes + 1))
        children = np.empty((nodes, k, dim), np.float32)
        child_of_doc = np.zeros(len(vectors), np.int64)
        with quiet_stderr():
            for node in range(nodes):
                rows = order[bounds[node] : bounds[node + 1]]
                if len(rows) < k:  # the same rule as ours: documents first, then node copies
                    children[node] = own[node]
                    children[node, : len(rows)] = vectors[rows]
                    if len(rows):
                        child_of_doc[rows] = nearest_centroid(vectors[rows], children[node])
                    continue
                points = np.ascontiguousarray(vectors[rows])
                kmeans = faiss.Kmeans(
                    dim,
                    k,
                    niter=config.em_steps,
                    seed=config.seed + node,
                    max_points_per_centroid=config.samples_per_step // k,
                    min_points_per_centroid=1,
                    verbose=False,
                )
                kmeans.train(points)
                children[node] = kmeans.centroids
                child_of_doc[rows] = kmeans.index.search(points, 1)[1][:, 0]
        node_of_doc = node_of_doc * k + child_of_doc
        own = children.reshape(nodes * k, dim)
        levels.append(own)
        seconds.append(time.perf_counter() - started)
        print(f"faiss level {level}: {seconds[-1]:.1f}s", flush=True)
    return levels, seconds


def bench_faiss(vectors: np.ndarray, config: HierarchyConfig) -> dict:
    try:
        import faiss
    except ImportError as error:
        return {"skipped": f"faiss-cpu not importable ({error}); pip install faiss-cpu"}
    started = time.perf_counter()
    levels, seconds = fit_faiss_hierarchy(vectors, config)
    fit_seconds = time.perf_counter() - started
    tree = ClusterTree(tuple(levels), embedder_name="random", branching=config.branching)
    paths = tree.route(vectors)
    sizes = [
        np.bincount(ids, minlength=n) for ids, n in zip(tree.block_ids(paths).T, tree.num_clusters)
    ]
    return {
        "version": faiss.__version__,
        "fit_seconds": round(fit_seconds, 1),
        "fit_seconds_per_level": [round(s, 1) for s in seconds],
        "inertia_per_level": [round(v, 5) for v in tree.inertia_per_level(vectors, paths)],
        "max_cluster_fraction_per_level": [round(float(s.max() / len(vectors)), 5) for s in sizes],
    }


def bench_em_step(repeats: int = 50) -> dict:
    """Seconds per assign + centroid-sum step, numpy vs jax.jit, at a full and a leaf-sized node."""
    import jax
    import jax.numpy as jnp

    from hmem_jax.hierarchy.routing import single_threaded_blas

    @jax.jit
    def jax_step(points, centroids):
        scores = jnp.sum(centroids * centroids, axis=1)[None, :] - 2.0 * points @ centroids.T
        one_hot = jax.nn.one_hot(jnp.argmin(scores, axis=1), centroids.shape[0], dtype=points.dtype)
        return one_hot.T @ points, one_hot.sum(axis=0)

    def numpy_step(points, centroids):
        assignment = nearest_centroid(points, centroids)
        one_hot = (assignment[None, :] == np.arange(len(centroids))[:, None]).astype(np.float32)
        return one_hot @ points, one_hot.sum(axis=1)

    results = {}
    rng = np.random.default_rng(0)
    for rows in (6400, 244):
        points = rng.standard_normal((rows, 384), dtype=np.float32)
        centroids = rng.standard_normal((16, 384), dtype=np.float32)
        device_points, device_centroids = jnp.asarray(points), jnp.asarray(centroids)
        jax.block_until_ready(jax_step(device_points, device_centroids))
        started = time.perf_counter()
        for _ in range(repeats):
            jax.block_until_ready(jax_step(device_points, device_centroids))
        jax_seconds = (time.perf_counter() - started) / repeats
        with single_threaded_blas():
            numpy_step(points, centroids)
            started = time.perf_counter()
            for _ in range(repeats):
                numpy_step(points, centroids)
            numpy_seconds = (time.perf_counter() - started) / repeats
        results[f"{rows}x384"] = {
            "numpy_ms": round(numpy_seconds * 1e3, 3),
            "jax_jit_ms": round(jax_seconds * 1e3, 3),
        }
    return results


def bench_embedders(minilm_docs: int) -> dict:
    from hmem_jax.data.sources import read_documents

    texts = [d.text for d in read_documents(DataConfig())]
    results = {
        "corpus": "embedded encyclopedia",
        "mean_chars": round(float(np.mean([len(t) for t in texts])), 1),
    }
    for name, count in (("hashed", len(texts)), ("minilm", minilm_docs)):
        try:
            embedder = get_embedder(name, **({"show_progress": False} if name == "minilm" else {}))
            embedder.embed(texts[:64])  # load the model / warm up
        except ImportError as error:
            results[name] = {"skipped": str(error).splitlines()[0]}
            continue
        started = time.perf_counter()
        embedder.embed(texts[:count])
        seconds = time.perf_counter() - started
        results[name] = {
            "documents": count,
            "seconds": round(seconds, 2),
            "docs_per_s": round(count / seconds),
        }
    # Longer documents (~800 characters of random words) for the hashed embedder.
    rng = np.random.default_rng(0)
    vocabulary = [
        "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 10)))
        for _ in range(5000)
    ]
    long_texts = [" ".join(rng.choice(vocabulary, 120)) + "." for _ in range(10000)]
    embedder = get_embedder("hashed")
    started = time.perf_counter()
    embedder.embed(long_texts)
    seconds = time.perf_counter() - started
    mean_chars = round(float(np.mean([len(t) for t in long_texts])))
    results["hashed_800_chars"] = {
        "documents": len(long_texts),
        "docs_per_s": round(len(long_texts) / seconds),
        "mean_chars": mean_chars,
    }
    return results


def probe_recall(
    tree: ClusterTree,
    embeddings: np.ndarray,
    texts: list[str],
    probes: list,
    embedder,
    document_index: dict,
) -> tuple[list[float], list[float]]:
    """Per level, means over probes of the share of (a) the documents mentioning the probe's
    entity and (b) the documents stating its answer (`Probe.documents`) that sit in the probe
    prompt's cluster: what a fetched memory block was trained on."""
    document_ids = tree.block_ids(tree.route(embeddings))
    probe_ids = tree.block_ids(tree.route_texts([p.prompt for p in probes], embedder))
    mentioning, stating = [], []
    for probe, ids in zip(probes, probe_ids):
        rows = [i for i, text in enumerate(texts) if probe.entity in text]
        if rows:
            mentioning.append((document_ids[rows] == ids).mean(axis=0))
        if probe.documents:
            rows = [document_index[d] for d in probe.documents]
            stating.append((document_ids[rows] == ids).mean(axis=0))

    def mean(shares: list) -> list[float]:
        return [round(float(v), 3) for v in np.mean(shares, axis=0)]

    return mean(mentioning), mean(stating)


def bench_routing_quality(small_entities: int, large_entities: int) -> dict:
    """Do prompts about an entity land where that entity's documents are? (hashed, hashed_idf,
    MiniLM)"""
    from hmem_jax.data.encyclopedia import cached_corpus
    from hmem_jax.hierarchy.embedders import fit_embedder

    config = HierarchyConfig(branching=16, depth=2)
    results = {
        "tree": "16x2, tree seeds 0-2",
        "metric": "mean share of the entity's documents in "
        "the probe prompt's cluster, levels 1 / 2 (random routing: 1/16, 1/256)",
    }
    for entities in (small_entities, large_entities):
        corpus = cached_corpus(entities, 0)
        texts = [d.text for d in corpus.documents]
        document_index = {d.id: i for i, d in enumerate(corpus.documents)}
        for name in ("hashed", "hashed_idf", "minilm"):
            if name == "minilm" and entities != small_entities:
                continue  # ~30 docs/s on this CPU: the small corpus only
            try:
                embedder = get_embedder(
                    name, **({"show_progress": False} if name == "minilm" else {})
                )
                fit_embedder(embedder, texts)
                embeddings = embedder.embed(texts)
            except ImportError as error:
                results[f"{name}_{entities}"] = {"skipped": str(error).splitlines()[0]}
                continue
            trees = [
                ClusterTree.fit(embeddings, dataclasses.replace(config, seed=seed), embedder)
                for seed in range(3)
            ]
            recalls = [
                probe_recall(tree, embeddings, texts, corpus.probes, embedder, document_index)
                for tree in trees
            ]
            per_seed = [mentioning for mentioning, _ in recalls]
            stating = [stating for _, stating in recalls]
            results[f"{name}_{entities}_entities"] = {
                "documents": len(texts),
                "probes": len(corpus.probes),
                "recall_per_level_mean_of_3_seeds": np.round(np.mean(per_seed, 0), 3).tolist(),
                "recall_per_level_per_seed": per_seed,
                "stating_recall_per_level_mean_of_3_seeds": np.round(
                    np.mean(stating, 0), 3
                ).tolist(),
            }
            print(name, entities, results[f"{name}_{entities}_entities"], flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--minilm_docs", type=int, default=2000)
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["ours", "faiss", "em_step", "embedders", "quality"],
    )
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    config = HierarchyConfig()
    result = {
        "command": "python " + " ".join(sys.argv),
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "numpy": np.__version__,
        "documents": args.docs,
        "dim": args.dim,
        "tree": f"{config.branching}x{config.depth}",
        "budget": f"{config.em_steps} steps x {config.samples_per_step} samples per node",
    }
    if "ours" in args.skip and "faiss" in args.skip:
        vectors = None
    else:
        started = time.perf_counter()
        vectors = random_unit_vectors(args.docs, args.dim)
        print(f"generated {args.docs} vectors in {time.perf_counter() - started:.1f}s", flush=True)
    if "ours" not in args.skip:
        result["ours"], _ = bench_ours(vectors, config)
        print(json.dumps(result["ours"]), flush=True)
    if "faiss" not in args.skip:
        result["faiss"] = bench_faiss(vectors, config)
        print(json.dumps(result["faiss"]), flush=True)
    del vectors
    if "em_step" not in args.skip:
        result["em_step"] = bench_em_step()
    if "embedders" not in args.skip:
        result["embedders"] = bench_embedders(args.minilm_docs)
    if "quality" not in args.skip:
        result["routing_quality"] = bench_routing_quality(300, 3000)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
