"""Fit the cluster tree on a corpus and write the tree, every document's path and a report.

    python -m hmem_jax.main.cluster --docs=PATH --out=DIR \
        [--gin_file=experiments/X.gin] [--gin_param='HierarchyConfig.depth = 3'] \
        [--cache_dir=DIR]

`--docs` is a `.jsonl` file (or a folder of them) with a `text` field, a folder
of `.txt` files, or the word `embedded` (the built-in synthetic corpus);
without it, `DataConfig.source`/`path` from gin decide, exactly as for
`hmem_jax.main.prepare`, so both read the same documents in the same order.
The embedder, branching, depth, EM budget, balancing and seed come from
`HierarchyConfig` (docs/method.md defaults: 16 x 4, 20 steps x 6,400 samples).

Writes into `--out`, which is then itself a tree folder (`ClusterTree.load(out)`,
`python -m hmem_jax.main.prepare --tree=OUT`):
  tree.json, centroids_level{1..depth}.npy   the ClusterTree
  paths.npy             int32[N, depth] child index per level, by greedy descent
  doc_ids.json          the N document ids, in the order of paths.npy
  report.json           cluster sizes, balance and inertia per level; timings
  config.gin            the gin configuration the run used
Embeddings are cached under `--cache_dir` (keyed by corpus and embedder), so
re-fitting with another tree shape or seed does not re-embed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from absl import flags

from hmem_jax import paths
from hmem_jax.config import ConfigError, DataConfig
from hmem_jax.hierarchy.corpus import cluster_corpus
from hmem_jax.main import common

DOCS = flags.DEFINE_string(
    "docs",
    "",
    "Corpus: a .jsonl file or folder of them, a folder of .txt files, or 'embedded'. "
    "Empty: DataConfig.source / DataConfig.path from gin.",
)
OUT = common.out_flag("Output folder for the tree, paths and report (required).")
CACHE_DIR = flags.DEFINE_string(
    "cache_dir",
    paths.cache_dir("embeddings"),
    "Embedding cache folder; empty disables the cache.",
)
QUIET = flags.DEFINE_bool("quiet", False, "No progress output.")


def data_config_for_docs(docs: str, base: DataConfig) -> DataConfig:
    """`base` with source/path set from a --docs value (file, folder or 'embedded')."""
    if not docs:
        return base
    if docs == "embedded":
        return dataclasses.replace(base, source="embedded", path="")
    path = Path(docs)
    if path.is_file():
        if path.suffix != ".jsonl":
            raise ConfigError(
                f"--docs={docs} is a file but not .jsonl; pass a .jsonl file (one "
                "JSON object with a 'text' field per line) or a folder of .txt "
                "files."
            )
        return dataclasses.replace(base, source="jsonl", path=str(path))
    if path.is_dir():
        has_jsonl = any(path.glob("*.jsonl"))
        source = "jsonl" if has_jsonl else "text_dir"
        return dataclasses.replace(base, source=source, path=str(path))
    raise ConfigError(
        f"--docs={docs} does not exist; pass a .jsonl file, a folder of .txt files, or 'embedded'."
    )


def main(argv: list[str]) -> None:
    if not OUT.value:
        common.fail("No output folder: pass --out=DIR.")
    config = common.config_from_flags()
    data = data_config_for_docs(DOCS.value, config.data)
    cluster_corpus(data, config.hierarchy, OUT.value, CACHE_DIR.value, verbose=not QUIET.value)


def run() -> None:
    """The command line entry point."""
    common.run(main, hint="use --docs, --out, --gin_file, --gin_param")


if __name__ == "__main__":
    run()
