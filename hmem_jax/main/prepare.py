"""Prepare training data: route (optional), tokenize and pack into shards + manifest.

    python -m hmem_jax.main.prepare --out=DIR --gin_file=experiments/X.gin \
        [--gin_param='DataConfig.source = "jsonl"'] [--tree=TREE_DIR]

`--out` defaults to `DataConfig.prepared_dir`. With `--tree` (a folder written
by `python -m hmem_jax.main.cluster`) documents are packed per leaf cluster and
every sequence carries its cluster path; without it, one stream (anchor-only
pretraining). An existing complete `--out` made with the same settings is
reused; one made with other settings is an error that names the differences.

With `--beam_runner=RUNNER` the same folder is made by an Apache Beam pipeline
(hmem_jax/data/beam_prepare.py; the `beam` extra), its options given as
`--beam_option=--NAME=VALUE`, e.g. on this machine

    python -m hmem_jax.main.prepare --out=DIR --tree=TREE --beam_runner=DirectRunner \
        --beam_option=--direct_num_workers=8 --beam_option=--direct_running_mode=multi_processing

and on Dataflow `--beam_runner=DataflowRunner --beam_option=--project=P
--beam_option=--region=R --beam_option=--temp_location=gs://B/tmp` (Flink and
Spark take `--flink_master=...` / `--spark_master_url=...`).
"""

from __future__ import annotations

import json

from absl import flags

from hmem_jax.main import common

OUT = common.out_flag("Output folder (default: DataConfig.prepared_dir).")
TREE = flags.DEFINE_string("tree", "", "ClusterTree folder; empty = no routing (one stream).")
QUIET = flags.DEFINE_bool("quiet", False, "No progress bar.")
BEAM_RUNNER = flags.DEFINE_string(
    "beam_runner", "", "Prepare with an Apache Beam pipeline on this runner; empty = in-process."
)
BEAM_OPTIONS = flags.DEFINE_multi_string(
    "beam_option", [], "A Beam pipeline option, e.g. --beam_option=--direct_num_workers=4."
)


def main(argv: list[str]) -> None:
    from hmem_jax.data.prepare import ensure_prepared
    from hmem_jax.data.prepared import read_manifest

    config = common.config_from_flags()
    out_dir = OUT.value or config.data.prepared_dir
    if not out_dir:
        common.fail("No output folder: pass --out=DIR (or set DataConfig.prepared_dir).")
    if BEAM_OPTIONS.value and not BEAM_RUNNER.value:
        common.fail("--beam_option needs --beam_runner (e.g. --beam_runner=DirectRunner).")
    beam_args = [f"--runner={BEAM_RUNNER.value}", *BEAM_OPTIONS.value] if BEAM_RUNNER.value else []
    ensure_prepared(
        config, out_dir, TREE.value or None, progress=not QUIET.value, beam_args=beam_args
    )
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
