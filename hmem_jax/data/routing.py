"""Routing documents to leaf clusters for preparation: a small adapter over `ClusterTree`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from hmem_jax.hierarchy.tree import ClusterTree


class TreeRouter:
    """What prepare needs from a ClusterTree: paths and block ids for texts, plus identity."""

    def __init__(self, tree: ClusterTree, embedder: Any | None = None) -> None:
        self.tree = tree
        self.embedder = tree.make_embedder() if embedder is None else embedder

    @classmethod
    def load(cls, tree_dir: str) -> TreeRouter:
        from hmem_jax.hierarchy.tree import ClusterTree  # the hierarchy package owns the format

        return cls(ClusterTree.load(tree_dir))

    @property
    def content_hash(self) -> str:
        return self.tree.content_hash

    @property
    def depth(self) -> int:
        return self.tree.depth

    def clusters_per_level(self) -> list[int]:
        """Number of blocks at each level 1..depth: the exclusive bound of its block ids."""
        return list(self.tree.num_clusters)

    def describe(self) -> dict[str, object]:
        return {
            "content_hash": self.content_hash,
            "depth": self.depth,
            "branching": self.tree.branching,
            "embedder": self.tree.embedder_name,
            "clusters_per_level": self.clusters_per_level(),
        }

    def route(self, texts: Sequence[str]) -> np.ndarray:
        """int32[N, depth] child index per level for each text."""
        paths = self.tree.route_texts(list(texts), self.embedder)
        return np.asarray(paths, dtype=np.int32).reshape(len(texts), self.depth)

    def block_ids(self, paths: np.ndarray) -> np.ndarray:
        return np.asarray(self.tree.block_ids(paths), dtype=np.int32).reshape(paths.shape)
