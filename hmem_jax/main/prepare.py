"""Prepare training data: route (optional), tokenize and pack into shards + manifest.

    python -m hmem_jax.main.prepare --out=DIR --gin_file=experiments/X.gin \
        [--gin_param='DataConfig.source = "jsonl"'] [--tree=TREE_DIR]

`--out` defaults to `DataConfig.prepared_dir`. With `--tree` (a folder written
by `python -m hmem_jax.main.cluster`) documents are packed per leaf cluster and
every sequence carries its cluster path; without it, one stream (anchor-only
pretraining). An existing complete `--out` made with the same settings is
reused; one made with other settings is an error that names the differences.
"""

from __future__ import annotations

import json

from absl import flags

from hmem_jax.main import common

OUT = common.out_flag("Output folder (default: DataConfig.prepared_dir).")
TREE = flags.DEFINE_string("tree", "", "ClusterTree folder; empty = no routing (one stream).")
QUIET = flags.DEFINE_bool("quiet", False, "No progress bar.")


def main(argv: list[str]) -> None:
    from hmem_jax.data.prepare import ensure_prepared
    from hmem_jax.data.prepared import read_manifest

    config = common.config_from_flags()
    out_dir = OUT.value or config.data.prepared_dir
    if not out_dir:
        common.fail("No output folder: pass --out=DIR (or set DataConfig.prepared_dir).")
    ensure_prepared(config, out_dir, TREE.value or None, progress=not QUIET.value)
    manifest = read_manifest(out_dir)
    summary = {
        key: manifest[key]
        for key in (
            "num_documents",
            "num_records",
            "num_tokens",
            "num_padding_tokens",
            "seq_len",
            "timing_s",
        )
    }
    summary.update(
        out=out_dir,
        leaves=manifest["leaves"]["count"],
        tree=(manifest["tree"] or {}).get("content_hash"),
        tokenizer=manifest["tokenizer"]["sha256"][:16],
        corpus=manifest["corpus"],
    )
    print(json.dumps(summary, indent=1))


def run() -> None:
    """The command line entry point."""
    common.run(main, hint="use --out, --tree, --gin_file, --gin_param")


if __name__ == "__main__":
    run()
