"""On-disk embedding cache, so re-clustering a corpus does not re-embed it.

Embedding is the slow step (MiniLM: a few hundred documents per second on a
CPU), while fitting a tree takes minutes, and trees get re-fitted whenever
the branching, depth, budget or seed changes. The cache key covers exactly
what determines the vectors: the corpus content (every text, in order) and
the embedder's name, dimension and version. Each entry is `<key>.npy` with a
`<key>.json` sidecar that says what it holds; entries are written to a
temporary file and renamed, so a crash never leaves a truncated entry. The
cache may be a gs:// or s3:// folder, shared by the hosts that cluster.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np

from hmem_jax import paths
from hmem_jax.hierarchy.embedders import Embedder


def corpus_hash(texts: Iterable[str]) -> str:
    """sha256 hex over the texts in order (length-prefixed, so boundaries count)."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8", errors="surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def cache_key(embedder: Embedder, content_hash: str) -> str:
    """The entry name for a corpus hash embedded by `embedder`."""
    identity = json.dumps(
        {
            "corpus": content_hash,
            "embedder": embedder.name,
            "dim": int(embedder.dim),
            "version": getattr(embedder, "version", ""),
        },
        sort_keys=True,
    )
    return f"{embedder.name}-{embedder.dim}-{hashlib.sha256(identity.encode()).hexdigest()[:24]}"


def embed_cached(
    embedder: Embedder, texts: Sequence[str], cache_dir: str | os.PathLike | None
) -> np.ndarray:
    """float32[N, dim] embeddings of `texts`, read from `cache_dir` when present, else computed
    and stored there. `cache_dir=None` disables the cache."""
    texts = list(texts)
    if cache_dir is None:
        return embedder.embed(texts)
    content_hash = corpus_hash(texts)
    key = cache_key(embedder, content_hash)
    directory = str(cache_dir)
    array_path = paths.join(directory, f"{key}.npy")
    if paths.isfile(array_path):
        cached = np.load(io.BytesIO(paths.read_bytes(array_path)), allow_pickle=False)
        if cached.shape == (len(texts), embedder.dim) and cached.dtype == np.float32:
            return cached
        # A mismatched entry can only come from a foreign file; recompute and replace it.
    vectors = np.ascontiguousarray(embedder.embed(texts), dtype=np.float32)
    if vectors.shape != (len(texts), embedder.dim):
        raise ValueError(
            f"Embedder '{embedder.name}' returned shape {vectors.shape}; expected "
            f"{(len(texts), embedder.dim)}."
        )
    _store(vectors, directory, key)
    sidecar = {
        "embedder": embedder.name,
        "dim": int(embedder.dim),
        "version": getattr(embedder, "version", ""),
        "documents": len(texts),
        "corpus_hash": content_hash,
    }
    paths.write_text(
        paths.join(directory, f"{key}.json"), json.dumps(sidecar, indent=2, sort_keys=True)
    )
    return vectors


def _store(vectors: np.ndarray, directory: str, key: str) -> None:
    """`<key>.npy` whole or not at all: locally a temporary file renamed into place; on an
    object store one upload (an object appears whole)."""
    if paths.is_remote(directory):
        buffer = io.BytesIO()
        np.save(buffer, vectors)
        paths.write_bytes(paths.join(directory, f"{key}.npy"), buffer.getvalue())
        return
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(directory, f"{key}.{os.getpid()}.tmp.npy")
    np.save(temporary, vectors)
    os.replace(temporary, os.path.join(directory, f"{key}.npy"))
