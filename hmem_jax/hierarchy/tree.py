"""ClusterTree: the fitted centroid hierarchy, its routes and its on-disk form.

A tree is immutable: centroids per level (level l: float32[branching**l, D],
grouped by parent, see `kmeans`), the embedder it was fitted in (name and
dimension), the branching factor and the seed. Routes are int32[N, depth]
child indices; `block_ids` turns them into global cluster ids per level, the
ids the memory bank is indexed by.

On disk (`save` / `load`) a tree is a folder holding `centroids_level{l}.npy`
for each level and a `tree.json` manifest: format version, embedder name and
dimension, branching, depth, seed, a content hash over the manifest fields and
every centroid byte, and provenance of the fit. Loading recomputes the hash, so
a modified or truncated array is an error instead of silently different routes.
An embedder fitted on the corpus ('hashed_idf') adds `embedder_state.npz`,
covered by the same hash.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hmem_jax.config import HierarchyConfig
from hmem_jax.errors import MissingPathError, TreeError
from hmem_jax.hierarchy.embedders import Embedder, embedder_state
from hmem_jax.hierarchy.kmeans import fit_hierarchical_kmeans
from hmem_jax.hierarchy.routing import (
    block_ids_from_paths,
    greedy_paths,
    squared_norms,
    validate_embeddings,
)

MANIFEST_NAME = "tree.json"
EMBEDDER_STATE_NAME = "embedder_state.npz"
FORMAT_VERSION = 1


def _folder(directory: str | os.PathLike) -> Any:
    """A tree folder as a path object: pathlib for local folders, etils.epath for gs:// and
    s3:// URLs (a tree may be read from an object store; it is written locally)."""
    from hmem_jax import paths

    if paths.is_remote(directory):
        return paths.epath_of(str(directory))
    return Path(directory)


def _load_array_file(path: Any) -> Any:
    """np.load of a local file, or of an object's bytes (np.load cannot open a URL)."""
    if isinstance(path, Path):
        return np.load(path, allow_pickle=False)
    return np.load(io.BytesIO(path.read_bytes()), allow_pickle=False)


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """A saved tree's `tree.json` (identity, files, provenance), without loading its arrays."""
    manifest_path = _folder(directory) / MANIFEST_NAME
    if not manifest_path.is_file():
        raise MissingPathError(
            f"No {MANIFEST_NAME} in {directory}; expected a folder written "
            "by ClusterTree.save or python -m hmem_jax.main.cluster."
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TreeError(
            f"{manifest_path} is not JSON ({error}); the tree folder is damaged: restore it or "
            "re-fit the tree."
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        found = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise TreeError(
            f"{manifest_path} has format_version {found};"
            f" this code reads version {FORMAT_VERSION}. Re-fit the tree."
        )
    return manifest


@dataclasses.dataclass(frozen=True, eq=False)
class ClusterTree:
    """Centroids per level plus the identity of the embedding space they live in.

    `levels[l-1]` is float32[branching**l, dim]. `embedder_version` (the
    embedder's `version`, empty when unknown) is checked against the caller's
    embedder too, since one name can change its vectors between releases.
    `fit_info` is provenance only (budget, timings, corpus hash); it is saved
    but not part of `content_hash`. `embedder_state` holds the corpus
    statistics of an embedder that has them (the document frequencies of
    'hashed_idf'): routing a prompt needs the very statistics the tree's
    documents were embedded with, so they live, and are hashed, with the tree.
    """

    levels: tuple[np.ndarray, ...]
    embedder_name: str
    branching: int
    seed: int = 0
    embedder_version: str = ""
    fit_info: dict = dataclasses.field(default_factory=dict)
    embedder_state: dict = dataclasses.field(default_factory=dict)  # name -> array, see below

    def __post_init__(self) -> None:
        if not self.levels:
            raise ValueError("A ClusterTree needs at least one level of centroids.")
        levels = tuple(np.ascontiguousarray(c, dtype=np.float32) for c in self.levels)
        dim = levels[0].shape[-1]
        for index, centroids in enumerate(levels, start=1):
            expected = (self.branching**index, dim)
            if centroids.shape != expected:
                raise ValueError(
                    f"Level {index} centroids have shape {centroids.shape}; expected "
                    f"{expected} (branching {self.branching}, dim {dim})."
                )
            if not np.isfinite(centroids).all():
                raise ValueError(f"Level {index} centroids contain NaN or infinite values.")
            centroids.setflags(write=False)
        object.__setattr__(self, "levels", levels)
        state = {key: np.ascontiguousarray(value) for key, value in self.embedder_state.items()}
        for value in state.values():
            value.setflags(write=False)
        object.__setattr__(self, "embedder_state", state)

    # -- identity ---------------------------------------------------------------------

    @property
    def dim(self) -> int:
        return int(self.levels[0].shape[1])

    @property
    def depth(self) -> int:
        return len(self.levels)

    @property
    def num_clusters(self) -> tuple[int, ...]:
        """Clusters per level, e.g. (16, 256, 4096, 65536)."""
        return tuple(len(c) for c in self.levels)

    def _identity(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "embedder": self.embedder_name,
            "dim": self.dim,
            "embedder_version": self.embedder_version,
            "branching": self.branching,
            "depth": self.depth,
            "seed": self.seed,
        }

    @functools.cached_property
    def content_hash(self) -> str:
        """sha256 hex of the identity fields and every centroid byte (float32, C order)."""
        digest = hashlib.sha256(json.dumps(self._identity(), sort_keys=True).encode())
        for centroids in self.levels:
            digest.update(centroids.astype("<f4", copy=False).tobytes())
        for key in sorted(self.embedder_state):
            value = self.embedder_state[key]
            digest.update(f"{key}:{value.dtype.str}:{value.shape}".encode())
            digest.update(value.tobytes())
        return digest.hexdigest()

    def make_embedder(self, **options: Any) -> Embedder:
        """The embedder this tree routes with, carrying the statistics it was fitted with."""
        from hmem_jax.hierarchy.embedders import get_embedder

        embedder = get_embedder(self.embedder_name, state=self.embedder_state or None, **options)
        self.check_embedder(embedder)
        return embedder

    def check_embedder(self, embedder: Embedder | str, dim: int | None = None) -> None:
        """Raise TreeError unless `embedder` (or its name and `dim`) matches the tree's."""
        name = embedder if isinstance(embedder, str) else embedder.name
        if dim is None and not isinstance(embedder, str):
            dim = embedder.dim
        if name != self.embedder_name or (dim is not None and dim != self.dim):
            raise TreeError(
                f"This cluster tree was fitted on '{self.embedder_name}' embeddings of dimension "
                f"{self.dim}, but the caller uses '{name}' of dimension {dim}. Routes are only "
                f"meaningful in the tree's own space: embed with '{self.embedder_name}' "
                f"(HierarchyConfig.embedder = '{self.embedder_name}'), or re-fit the tree with "
                f"'{name}' (python -m hmem_jax.main.cluster)."
            )
        version = "" if isinstance(embedder, str) else getattr(embedder, "version", "")
        if self.embedder_state and not isinstance(embedder, str) and not embedder_state(embedder):
            raise ValueError(
                f"This cluster tree's '{self.embedder_name}' embedder carries the corpus "
                "statistics it was fitted with, but the caller's has none: route with "
                "tree.make_embedder(), not a fresh get_embedder()."
            )
        if version and self.embedder_version and version != self.embedder_version:
            raise TreeError(
                f"This cluster tree was fitted on '{self.embedder_name}' version "
                f"'{self.embedder_version}', but the caller's '{name}' is version '{version}' "
                "(same name, different vectors). Re-fit the tree with the current embedder "
                "(python -m hmem_jax.main.cluster), or embed with the options it was built with."
            )

    # -- fitting and routing ----------------------------------------------------------

    @classmethod
    def fit(
        cls,
        embeddings: np.ndarray,
        config: HierarchyConfig,
        embedder: Embedder | str,
        progress: Callable[[str], None] | None = None,
        fit_info: dict | None = None,
    ) -> ClusterTree:
        """Fit balanced hierarchical k-means (see `kmeans`) with a HierarchyConfig's settings.

        `embedder` (an Embedder, or just a name) is recorded as the tree's space;
        `config.embedder` is not consulted, so trees can be fitted on any vectors
        (tests, benchmarks).
        """
        name = embedder if isinstance(embedder, str) else embedder.name
        version = "" if isinstance(embedder, str) else getattr(embedder, "version", "")
        state = {} if isinstance(embedder, str) else embedder_state(embedder)
        levels, stats = fit_hierarchical_kmeans(embeddings, config, progress=progress)
        info = {
            "documents": int(len(embeddings)),
            "em_steps": config.em_steps,
            "samples_per_step": config.samples_per_step,
            "balance_threshold": config.effective_balance_threshold,
            "levels": [dataclasses.asdict(s) for s in stats],
            **(fit_info or {}),
        }
        return cls(
            tuple(levels),
            embedder_name=name,
            branching=config.branching,
            seed=config.seed,
            embedder_version=version,
            fit_info=info,
            embedder_state=state,
        )

    @functools.cached_property
    def _level_norms(self) -> tuple[np.ndarray, ...]:
        return tuple(squared_norms(c) for c in self.levels)

    def route(
        self, embeddings: np.ndarray, batch_size: int | None = None, workers: int | None = None
    ) -> np.ndarray:
        """int32[N, depth] paths (child index per level) by greedy nearest-centroid descent.

        Vectorised and multi-threaded (see `routing.greedy_paths`); the paths do
        not depend on `batch_size` or `workers`.
        """
        embeddings = validate_embeddings(embeddings, dim=self.dim, allow_empty=True)
        return greedy_paths(
            embeddings,
            self.levels,
            self.branching,
            self._level_norms,
            batch_size=batch_size,
            workers=workers,
        )

    def route_texts(self, texts: Sequence[str], embedder: Embedder) -> np.ndarray:
        """int32[N, depth] paths of raw texts (prompts, documents), embedded with `embedder`."""
        self.check_embedder(embedder)
        return self.route(embedder.embed(list(texts)))

    def block_ids(self, paths: np.ndarray) -> np.ndarray:
        """int32[N, depth] global cluster id per level (id_l = id_{l-1} * branching + child_l)."""
        paths = np.asarray(paths)
        if paths.ndim != 2 or paths.shape[1] != self.depth:
            raise ValueError(f"paths must have shape [N, {self.depth}]; got {paths.shape}.")
        return block_ids_from_paths(paths, self.branching)

    def inertia_per_level(
        self, embeddings: np.ndarray, paths: np.ndarray | None = None
    ) -> list[float]:
        """Mean squared L2 distance of each document to its cluster's centroid, per level."""
        embeddings = validate_embeddings(embeddings, dim=self.dim, allow_empty=False)
        ids = self.block_ids(self.route(embeddings) if paths is None else paths)
        result = []
        for level, centroids in enumerate(self.levels):
            total = 0.0
            for start in range(0, len(embeddings), 1 << 17):
                chunk = embeddings[start : start + (1 << 17)]
                diff = chunk - centroids[ids[start : start + len(chunk), level]]
                total += float(np.einsum("nd,nd->", diff, diff, dtype=np.float64))
            result.append(total / len(embeddings))
        return result

    # -- persistence ------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `centroids_level{l}.npy` and `tree.json` into `directory` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files = []
        for level, centroids in enumerate(self.levels, start=1):
            name = f"centroids_level{level}.npy"
            np.save(directory / name, centroids)
            files.append({"level": level, "clusters": len(centroids), "file": name})
        manifest = {
            **self._identity(),
            "content_hash": self.content_hash,
            "levels": files,
            "fit": self.fit_info,
        }
        if self.embedder_state:
            np.savez(directory / EMBEDDER_STATE_NAME, **self.embedder_state)
            manifest["embedder_state"] = EMBEDDER_STATE_NAME
        temporary = directory / (MANIFEST_NAME + ".tmp")
        temporary.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.replace(temporary, directory / MANIFEST_NAME)  # the manifest appears last
        return directory

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        embedder: Embedder | str | None = None,
        dim: int | None = None,
    ) -> ClusterTree:
        """Read a saved tree; if `embedder` (and `dim`) is given, it must match the tree's."""
        directory = _folder(directory)
        manifest = read_manifest(directory)
        if manifest.get("embedder_state"):
            if not (directory / manifest["embedder_state"]).is_file():
                raise TreeError(
                    f"{directory}: the tree's {manifest['embedder_state']} (its "
                    "embedder's corpus statistics) is missing; restore the folder "
                    "or re-fit the tree."
                )
        try:
            tree = cls._from_files(directory, manifest)
            identity = (manifest["dim"], manifest["depth"], manifest["content_hash"])
        except (OSError, EOFError, KeyError, TypeError, ValueError) as error:
            raise TreeError(
                f"{directory}: the tree's files cannot be read ({type(error).__name__}: "
                f"{error}); the folder is damaged or incomplete: restore it or re-fit the tree."
            ) from error
        saved_dim, saved_depth, content_hash = identity
        if tree.dim != saved_dim or tree.depth != saved_depth:
            raise TreeError(
                f"{directory}: centroid arrays (dim {tree.dim}, depth {tree.depth}) "
                f"disagree with the manifest (dim {saved_dim}, depth {saved_depth}); the folder "
                "is corrupt, re-fit the tree."
            )
        if tree.content_hash != content_hash:
            raise TreeError(
                f"{directory}: the centroids' content hash {tree.content_hash[:12]} "
                f"differs from the manifest's {str(content_hash)[:12]}; the "
                "arrays were modified or truncated. Re-fit or restore the tree."
            )
        if embedder is not None:
            tree.check_embedder(embedder, dim)
        return tree

    @classmethod
    def _from_files(cls, directory: Any, manifest: dict[str, Any]) -> ClusterTree:
        """The tree the manifest and its array files describe (not yet checked against the
        manifest's identity and hash)."""
        levels = tuple(
            _load_array_file(directory / entry["file"])
            for entry in sorted(manifest["levels"], key=lambda e: e["level"])
        )
        state: dict[str, np.ndarray] = {}
        if manifest.get("embedder_state"):
            with _load_array_file(directory / manifest["embedder_state"]) as arrays:
                state = {key: arrays[key] for key in arrays.files}
        return cls(
            levels,
            embedder_name=manifest["embedder"],
            branching=manifest["branching"],
            seed=manifest["seed"],
            embedder_version=manifest.get("embedder_version", ""),
            fit_info=manifest.get("fit", {}),
            embedder_state=state,
        )
