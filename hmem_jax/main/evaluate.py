"""Evaluate a run: `python -m hmem_jax.main.evaluate --workdir=DIR`.

By default: the long-tail probe on the prepared data's probes.jsonl, or on
`--probe_file=FILE.jsonl` (rows {"prompt", "answer", "bucket"}, optionally
"documents"; see hmem_jax/infer/probe.py), in every condition the run
supports (anchor, generic, fetched, blocked, oracle when the probes name
their documents; `--rag` adds the retrieval baseline).
`--baseline=RUN` (repeatable) scores other runs (e.g. an anchor-only run of
the same budget, or a bigger anchor) on the same probes, side by side. With
`--perplexity`, document perplexity. `--task=FILE.jsonl` (repeatable) adds
multiple-choice or generation tasks (see hmem_jax/infer/tasks.py) with
`--shots` few-shot examples. Writes OUT/results.json (default OUT =
WORKDIR/eval), prints tables, and draws PNG plots when matplotlib is present.
"""

from __future__ import annotations

import json
import os
import random

from absl import flags

from hmem_jax import paths
from hmem_jax.main import common

WORKDIR = common.workdir_flag()
OUT = common.out_flag("Results folder (default WORKDIR/eval).")
STEP = common.step_flag()
PROBE = flags.DEFINE_bool("probe", True, "Run the long-tail probe (needs probes.jsonl).")
PROBE_FILE = flags.DEFINE_string(
    "probe_file", "", "A jsonl probe file (default: the prepared data's probes.jsonl)."
)
ELEMENTS = flags.DEFINE_bool(
    "elements",
    False,
    "Probe the 118 chemical elements' atomic numbers (the paper's probe), "
    "bucketed by how often the run's training corpus names each element.",
)
BASELINES = flags.DEFINE_multi_string(
    "baseline",
    [],
    "Another run's folder, probed on the same prompts and printed beside this run; repeatable.",
)
CONDITIONS = flags.DEFINE_list(
    "conditions",
    ["anchor", "generic", "fetched", "blocked", "oracle"],
    "Probe conditions: anchor, generic, fetched, blocked, oracle (needs probes with "
    "'documents'), rag.",
)
RAG = flags.DEFINE_bool("rag", False, "Add the retrieval baseline (nearest training document).")
PERPLEXITY = flags.DEFINE_string(
    "perplexity",
    "",
    "Documents for perplexity: a jsonl file ({'text', optional 'bucket'}) or "
    "'train_sample' (a sample of the training corpus, bucketed for the embedded encyclopedia).",
)
PPL_DOCS = flags.DEFINE_integer("perplexity_documents", 200, "Documents sampled for perplexity.")
TASKS = flags.DEFINE_multi_string("task", [], "A jsonl task file; repeatable.")
SHOTS = flags.DEFINE_integer("shots", 3, "Few-shot examples per task (taken from its start).")
MODES = flags.DEFINE_list(
    "modes", ["none", "generic", "fetched"], "Memory modes for tasks and perplexity."
)
LIMIT = flags.DEFINE_integer("limit", 0, "Evaluate at most this many items per task/probe.")


def _modes(engine) -> list[str]:
    modes = [m for m in MODES.value if m == "none" or engine.has_memory]
    return [m for m in modes if m != "generic" or engine.has_generic]


def _probe(engine, run, rag, out: str, results: dict) -> None:
    from hmem_jax.infer.engine import Engine
    from hmem_jax.infer.plots import plot_by_bucket
    from hmem_jax.infer.probe import (
        compare_runs,
        documents_by_id,
        element_probes,
        format_probe_table,
        read_probe_file,
        sample_probes,
    )
    from hmem_jax.infer.run import load_run

    path = PROBE_FILE.value or paths.join(run.prepared_dir, "probes.jsonl")
    if ELEMENTS.value:
        path, probes = "the 118 elements", element_probes(run.prepared_dir)
    elif not PROBE_FILE.value and not paths.isfile(path):
        print(f"probe: skipped ({path} does not exist; pass --probe_file=FILE.jsonl or --elements)")
        return
    else:
        probes = read_probe_file(path)
    probes = sample_probes(probes, LIMIT.value)
    conditions = list(CONDITIONS.value)
    if RAG.value and "rag" not in conditions:
        conditions.append("rag")
    documents = None
    if "oracle" in conditions and any(item.documents for item in probes):
        documents = documents_by_id(run.cfg.data)
    engines = {_run_name(run.workdir, ()): engine}
    for workdir in BASELINES.value:
        engines[_run_name(workdir, engines)] = Engine(load_run(workdir))
    table = compare_runs(engines, probes, conditions, documents, rag)
    if len(engines) == 1:
        prefix = next(iter(engines)) + ": "
        table = {name[len(prefix) :]: row for name, row in table.items()}
    results["probe"] = table
    print(
        f"\nlong-tail probe ({len(probes)} probes from {path}, accuracy % by frequency bucket, "
        "0 = rarest):\n" + format_probe_table(table),
        flush=True,
    )
    plot = plot_by_bucket(
        {k: v["per_bucket"] for k, v in table.items()},
        "accuracy",
        "long-tail probe",
        os.path.join(out, "probe.png"),
    )
    if plot:
        print(f"plot: {plot}")


def _run_name(workdir: str, taken) -> str:
    """A short row label for a run: its folder name (numbered when names repeat)."""
    name = os.path.basename(os.path.normpath(workdir)) or workdir
    number = 2
    while name in taken:
        name, number = f"{os.path.basename(os.path.normpath(workdir))}#{number}", number + 1
    return name


def _perplexity(engine, run, out: str, results: dict) -> None:
    from hmem_jax.infer.perplexity import document_perplexity, encyclopedia_buckets
    from hmem_jax.infer.plots import plot_by_bucket
    from hmem_jax.infer.rag import training_documents

    if PERPLEXITY.value == "train_sample":
        texts = training_documents(run.cfg)
        texts = random.Random(0).sample(texts, min(PPL_DOCS.value, len(texts)))
        buckets = None
        probes_path = paths.join(run.prepared_dir, "probes.jsonl")
        if paths.isfile(probes_path):
            from hmem_jax.data.encyclopedia import read_probes

            buckets = encyclopedia_buckets(texts, read_probes(probes_path))
    else:
        from hmem_jax.infer.inputs import read_documents

        texts, buckets = read_documents(PERPLEXITY.value)
        texts = texts[: PPL_DOCS.value]
        buckets = buckets[: PPL_DOCS.value] if buckets is not None else None
    per_mode = {mode: document_perplexity(engine, texts, mode, buckets) for mode in _modes(engine)}
    results["perplexity"] = per_mode
    print(f"\nperplexity ({len(texts)} documents, routed by whole document):")
    for mode, row in per_mode.items():
        extra = ""
        if "per_bucket" in row:
            extra = "  by bucket " + " ".join(f"{k}:{v:.2f}" for k, v in row["per_bucket"].items())
        print(f"  {mode:<8} {row['perplexity']:9.3f}{extra}")
    if buckets is not None:
        series = {}
        for mode, row in per_mode.items():
            keys = sorted(int(k) for k in row["per_bucket"] if int(k) >= 0)
            series[mode] = [row["per_bucket"][str(k)] for k in keys]
        plot_by_bucket(
            series, "perplexity", "document perplexity", os.path.join(out, "perplexity.png")
        )


def _tasks(engine, rag, results: dict) -> None:
    from hmem_jax.errors import InputFileError
    from hmem_jax.infer.tasks import (
        evaluate_choice,
        evaluate_generation,
        few_shot_prefix,
        read_task,
    )

    for path in TASKS.value:
        items = read_task(path)
        shots, items = items[: SHOTS.value], items[SHOTS.value :]
        if not items:
            raise InputFileError(
                f"--task={path} holds {len(shots)} items, all taken as few-shot examples "
                f"(--shots={SHOTS.value}); add items, or lower --shots."
            )
        if LIMIT.value:
            items = items[: LIMIT.value]
        prefix = few_shot_prefix(shots)
        evaluate = evaluate_choice if items[0].is_choice else evaluate_generation
        name = os.path.splitext(os.path.basename(path))[0]
        rows = {mode: evaluate(engine, items, prefix, mode) for mode in _modes(engine)}
        if rag is not None:
            rows["rag"] = evaluate(engine, items, prefix, "none", rag=rag)
        results.setdefault("tasks", {})[name] = rows
        metric = "accuracy" if items[0].is_choice else "exact_match"
        print(
            f"\ntask {name} ({len(items)} items, {len(shots)}-shot, {metric}): "
            + ", ".join(f"{mode} {100 * row[metric]:.1f}" for mode, row in rows.items()),
            flush=True,
        )


def main(argv: list[str]) -> None:
    from hmem_jax.infer.engine import Engine
    from hmem_jax.infer.probe import PROBE_CONDITIONS
    from hmem_jax.infer.retrieval import MEMORY_MODES
    from hmem_jax.infer.run import load_run

    if SHOTS.value < 0 or LIMIT.value < 0 or PPL_DOCS.value < 1:
        common.fail("--shots and --limit must be >= 0, --perplexity_documents >= 1.")
    for flag, given, known in (
        (CONDITIONS, CONDITIONS.value, PROBE_CONDITIONS),
        (MODES, MODES.value, MEMORY_MODES),
    ):
        unknown = [value for value in given if value not in known]
        if unknown:
            common.fail(f"--{flag.name}: unknown {unknown}; choose from {list(known)}.")
    run = load_run(WORKDIR.value, STEP.value)
    engine = Engine(run)
    target = OUT.value or paths.join(run.workdir, "eval")
    with paths.staged(target) as out:  # gs:// or s3:// --out: written here, then uploaded
        os.makedirs(out, exist_ok=True)
        rag = None
        if RAG.value or "rag" in CONDITIONS.value:
            from hmem_jax.infer.rag import NearestDocument, training_documents

            rag = NearestDocument(engine.embedder, training_documents(run.cfg))
        results: dict = {"workdir": run.workdir, "step": run.step}
        if PROBE.value:
            _probe(engine, run, rag, out, results)
        if PERPLEXITY.value:
            _perplexity(engine, run, out, results)
        _tasks(engine, rag, results)
        with open(os.path.join(out, "results.json"), "w") as handle:
            json.dump(results, handle, indent=1)
    print(f"\nresults: {paths.join(target, 'results.json')}", flush=True)


def run() -> None:
    """The command line entry point."""
    common.run(main)


if __name__ == "__main__":
    run()
