"""Embedders, balanced hierarchical k-means and the ClusterTree router (docs/method.md)."""

from hmem_jax.hierarchy.cache import corpus_hash, embed_cached
from hmem_jax.hierarchy.document_frequencies import DocumentFrequencies
from hmem_jax.hierarchy.embedders import (
    EMBEDDER_NAMES,
    Embedder,
    HashedNgramEmbedder,
    MiniLMEmbedder,
    embedder_state,
    fit_embedder,
    get_embedder,
)
from hmem_jax.hierarchy.kmeans import balance_assignments, fit_hierarchical_kmeans
from hmem_jax.hierarchy.report import cluster_report, format_report
from hmem_jax.hierarchy.routing import block_ids_from_paths
from hmem_jax.hierarchy.tree import ClusterTree

__all__ = [
    "EMBEDDER_NAMES",
    "ClusterTree",
    "DocumentFrequencies",
    "Embedder",
    "HashedNgramEmbedder",
    "MiniLMEmbedder",
    "balance_assignments",
    "block_ids_from_paths",
    "cluster_report",
    "corpus_hash",
    "embed_cached",
    "embedder_state",
    "fit_embedder",
    "fit_hierarchical_kmeans",
    "format_report",
    "get_embedder",
]
