"""User mistakes through the real command line: each ends with exit status 2 and one line that
names the problem, no traceback, and leaves what the run folder already holds byte for byte."""

import importlib.util
import os
import subprocess
import sys

import pytest
from helpers.small import SMALL_CORPUS_PARAMS, tree_hashes

ENV = {
    key: value
    for key, value in os.environ.items()
    if key not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE")
}
ENV.update(
    XLA_FLAGS="--xla_force_host_platform_device_count=1",
    AWS_SHARED_CREDENTIALS_FILE="/nonexistent/credentials",  # no AWS credentials anywhere
    AWS_CONFIG_FILE="/nonexistent/config",
    AWS_EC2_METADATA_DISABLED="true",
)
ANCHOR = SMALL_CORPUS_PARAMS + (
    "MemoryConfig.kind = 'none'",
    "TrainConfig.steps = 2",
    "TrainConfig.batch_size = 4",
    "TrainConfig.checkpoint_every = 2",
)


def _run(args):
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=300, env=ENV
    )


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, small_prepared_data):
    """A trained 2-step anchor run (config, checkpoint, prepared data under it)."""
    prepared, params = small_prepared_data
    workdir = tmp_path_factory.mktemp("mistakes") / "run"
    done = _run(
        ["hmem_jax.main.train", f"--workdir={workdir}", "--probe_limit=0"]
        + [f"--gin_param={p}" for p in params + ANCHOR[len(SMALL_CORPUS_PARAMS) :]]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, prepared


def _files(tmp):
    """Bad input files a user might point at."""
    (tmp / "empty.jsonl").write_text("")
    (tmp / "garbage.jsonl").write_text("not json\n{broken\n")
    (tmp / "no_text.jsonl").write_text('{"title": "x"}\n{"body": 1}\n')
    (tmp / "empty_dir").mkdir(exist_ok=True)
    (tmp / "probes.jsonl").write_text("this is not a probe\n")
    (tmp / "not_a_tree").mkdir(exist_ok=True)
    (tmp / "full").mkdir(exist_ok=True)
    (tmp / "full" / "config.json").write_text("{}")
    (tmp / "tokenizer.model").write_text("not a sentencepiece model")


RUN = "{run}"
MEMORY = (
    "MemoryConfig.kind = 'ffn'",
    "MemoryConfig.level_sizes = (8, 4)",
    "HierarchyConfig.branching = 4",
    "HierarchyConfig.depth = 2",
)


COMPILE = ("hmem_jax.main.compile",)  # the default TrainConfig: an anchor-only step


def _train(*params, workdir="{tmp}/fresh"):
    """train on a fresh folder, or (workdir=RUN) on the trained run with its prepared data."""
    shared = ("DataConfig.prepared_dir = '{prepared}'",) if workdir == RUN else ()
    return ["hmem_jax.main.train", f"--workdir={workdir}", "--probe_limit=0"] + [
        f"--gin_param={p}" for p in ANCHOR + shared + params
    ]


MISTAKES = {
    # Values and types in the configuration.
    "steps-float": (_train("TrainConfig.steps = 2.5"), "TrainConfig.steps = 2.5 must be an int"),
    "steps-string": (_train("TrainConfig.steps = 'abc'"), "must be an int"),
    "steps-zero": (_train("TrainConfig.steps = 0"), "TrainConfig.steps"),
    "batch-negative": (_train("TrainConfig.batch_size = -4"), "TrainConfig.batch_size"),
    "lr-zero": (_train("OptimConfig.peak_lr = 0.0"), "OptimConfig.peak_lr"),
    "lr-string": (_train("OptimConfig.peak_lr = '3e-3'"), "must be a number"),
    "schedule": (_train("OptimConfig.schedule = 'linear'"), "OptimConfig.schedule"),
    "memory-kind": (_train("MemoryConfig.kind = 'huge'"), "MemoryConfig.kind"),
    "bank-tier": (_train("MemoryConfig.bank_tier = 'disk'"), "MemoryConfig.bank_tier"),
    "rank-float": (
        _train("MemoryConfig.kind = 'ffn'", "MemoryConfig.level_sizes = (8, 4.5)"),
        "tuple of ints",
    ),
    "levels-vs-tree": (
        _train("MemoryConfig.kind = 'ffn'", "MemoryConfig.level_sizes = (8, 4, 2, 1, 1)"),
        "level_sizes",
    ),
    "bool-as-int": (_train("model_preset.tie_embeddings = 1"), "True or False"),
    "preset": (_train("model_preset.name = 'huge'"), "huge"),
    "mesh-zero": (_train("MeshConfig.data = 0"), "MeshConfig.data"),
    "mesh-two-auto": (_train("MeshConfig.data = -1", "MeshConfig.fsdp = -1"), "at most one"),
    "mesh-too-big": (_train("MeshConfig.data = 3", "MeshConfig.fsdp = 1"), "devices"),
    "grad-accum": (_train("TrainConfig.grad_accum_steps = 3"), "divisible"),
    "unknown-field": (_train("TrainConfig.no_such_field = 1"), "no_such_field"),
    "unknown-configurable": (_train("NoSuchConfig.steps = 1"), "NoSuchConfig"),
    "gin-syntax": (_train("TrainConfig.steps = "), "Invalid gin"),
    "gin-file": (
        ["hmem_jax.main.train", "--workdir={tmp}/fresh", "--gin_file=no_such_experiment"],
        "no such file",
    ),
    "cotrain-no-anchor": (
        _train(*MEMORY, "MemoryConfig.mode = 'cotrain'"),
        "TrainConfig.init_from",
    ),
    # Object stores without credentials (tests/test_object_store*.py: the rest, with servers).
    "workdir-s3-no-credentials": (
        _train(workdir="s3://hmem-test/run"),
        "--workdir=s3://hmem-test/run: no AWS credentials were found",
    ),
    "prepared-dir-s3-no-credentials": (
        _train("DataConfig.prepared_dir = 's3://hmem-test/data'"),
        "DataConfig.prepared_dir=s3://hmem-test/data: no AWS credentials were found",
    ),
    # Data paths and files.
    "jsonl-no-path": (_train("DataConfig.source = 'jsonl'"), "DataConfig.path"),
    "jsonl-missing": (
        _train("DataConfig.source = 'jsonl'", "DataConfig.path = '{tmp}/no_such.jsonl'"),
        "DataConfig.path",
    ),
    "jsonl-empty": (
        _train("DataConfig.source = 'jsonl'", "DataConfig.path = '{tmp}/empty.jsonl'"),
        "empty.jsonl",
    ),
    "jsonl-garbage": (
        _train("DataConfig.source = 'jsonl'", "DataConfig.path = '{tmp}/garbage.jsonl'"),
        "garbage.jsonl",
    ),
    "jsonl-no-text": (
        _train("DataConfig.source = 'jsonl'", "DataConfig.path = '{tmp}/no_text.jsonl'"),
        "no_text.jsonl",
    ),
    "text-dir-empty": (
        _train("DataConfig.source = 'text_dir'", "DataConfig.path = '{tmp}/empty_dir'"),
        "empty_dir",
    ),
    "tokenizer-missing": (
        _train("DataConfig.tokenizer_path = '{tmp}/no_such.model'"),
        "DataConfig.tokenizer_path",
    ),
    "tokenizer-garbage": (
        _train("DataConfig.tokenizer_path = '{tmp}/tokenizer.model'"),
        "tokenizer.model",
    ),
    "tree-missing": (
        _train(*MEMORY, "TrainConfig.tree_dir = '{tmp}/not_a_tree'"),
        "TrainConfig.tree_dir",
    ),
    "init-from-missing": (
        _train(
            *MEMORY,
            "MemoryConfig.mode = 'cotrain'",
            "TrainConfig.init_from = '{tmp}/no_such_run'",
        ),
        "init_from",
    ),
    # An existing run.
    "resume-other-model": (
        _train("model_preset.d_model = 32", workdir=RUN),
        "fresh --workdir",
    ),
    "resume-other-batch": (
        _train("TrainConfig.batch_size = 8", workdir=RUN),
        "batch_size",
    ),
    "generate-fetched-on-anchor": (
        ["hmem_jax.main.generate", f"--workdir={RUN}", "--prompt=The", "--memory=fetched"],
        "--memory=none",
    ),
    "generate-no-checkpoint": (
        ["hmem_jax.main.generate", "--workdir={tmp}/empty_dir", "--prompt=The"],
        "empty_dir",
    ),
    "generate-missing-step": (
        ["hmem_jax.main.generate", f"--workdir={RUN}", "--prompt=The", "--step=7"],
        "no step 7",
    ),
    "evaluate-probe-missing": (
        ["hmem_jax.main.evaluate", f"--workdir={RUN}", "--probe_file={tmp}/no_such.jsonl"],
        "no_such.jsonl",
    ),
    "evaluate-probe-garbage": (
        ["hmem_jax.main.evaluate", f"--workdir={RUN}", "--probe_file={tmp}/probes.jsonl"],
        "probes.jsonl",
    ),
    "export-non-empty": (
        ["hmem_jax.main.export", f"--workdir={RUN}", "--out={tmp}/full"],
        "--overwrite",
    ),
    "export-fetched-no-route": (
        ["hmem_jax.main.export", f"--workdir={RUN}", "--out={tmp}/hf", "--memory=fetched"],
        "--route_text",
    ),
    # Flags of every entry point.
    "train-stray-argument": (_train() + ["extra"], "Unexpected arguments"),
    "train-unknown-flag": (_train() + ["--stepz=3"], "stepz"),
    "train-bad-flag-value": (_train() + ["--until_step=abc"], "until_step"),
    "generate-no-workdir": (["hmem_jax.main.generate", "--prompt=The"], "--workdir"),
    "evaluate-unknown-flag": (
        ["hmem_jax.main.evaluate", f"--workdir={RUN}", "--probes=1"],
        "probes",
    ),
    "export-no-out": (["hmem_jax.main.export", f"--workdir={RUN}"], "--out"),
    "bank-no-command": (["hmem_jax.main.bank"], "inspect"),
    "bank-missing-store": (
        [
            "hmem_jax.main.bank",
            "inspect",
            "--store={tmp}/no_bank",
            "--gin_param=MemoryConfig.kind = 'ffn'",
            "--gin_param=MemoryConfig.level_sizes = (4, 2)",
            "--gin_param=HierarchyConfig.branching = 4",
            "--gin_param=HierarchyConfig.depth = 2",
        ],
        "manifest.json",
    ),
    "import-hf-missing": (
        ["hmem_jax.main.import_hf", "--hf_dir={tmp}/no_model", "--out={tmp}/imported"],
        "no_model",
    ),
    "info-bad-value": (["hmem_jax.main.info", "--gin_param=TrainConfig.steps = -1"], "steps"),
    # `compile --devices`: a device count the mesh or the batch cannot use (nothing compiles).
    "compile-devices-zero": ([*COMPILE, "--devices=0"], "--devices = 0"),
    "compile-devices-vs-mesh": (
        [
            *COMPILE,
            "--devices=8",
            "--gin_param=MeshConfig.data = 3",
            "--gin_param=MeshConfig.fsdp = 1",
        ],
        "needs 3 devices but 8 are present",
    ),
    "compile-devices-vs-auto-axis": (
        [*COMPILE, "--devices=8", "--gin_param=MeshConfig.data = 3"],
        "does not divide the 8 devices",
    ),
    "compile-devices-vs-batch": (
        [*COMPILE, "--devices=8", "--gin_param=TrainConfig.batch_size = 4"],
        "does not divide over the 8 batch shards",
    ),
    "compile-devices-vs-slices": (
        [*COMPILE, "--devices=8", "--gin_param=MeshConfig.dcn_data = 3"],
        "dcn_* sizes multiply to 3",
    ),
    "compile-devices-and-topology": (
        [*COMPILE, "--devices=8", "--topology=v5e:2x2"],
        "give one of them",
    ),
    "compile-topology-malformed": ([*COMPILE, "--topology=v5e-8"], "--topology = 'v5e-8'"),
    "cluster-no-out": (["hmem_jax.main.cluster"], "--out"),
    "prepare-missing-corpus": (
        [
            "hmem_jax.main.prepare",
            "--out={tmp}/prep",
            "--gin_param=DataConfig.source = 'jsonl'",
            "--gin_param=DataConfig.path = '{tmp}/no_such.jsonl'",
        ],
        "DataConfig.path",
    ),
    **(
        {}
        if importlib.util.find_spec("libtpu")
        else {"compile-topology-no-libtpu": ([*COMPILE, "--topology=v5e:2x2"], "libtpu")}
    ),
    "recipe-without-memory": (
        [
            "hmem_jax.main.recipe",
            "--workdir={tmp}/recipe",
            "--gin_param=MemoryConfig.kind = 'none'",
        ],
        "MemoryConfig.kind",
    ),
}


@pytest.mark.parametrize("name", sorted(MISTAKES))
def test_a_user_mistake_is_one_line_and_changes_nothing(name, tmp_path, run_folder):
    workdir, prepared = run_folder
    _files(tmp_path)
    args, needle = MISTAKES[name]
    places = {"{tmp}": str(tmp_path), RUN: str(workdir), "{prepared}": prepared}
    for key, value in places.items():
        args = [a.replace(key, value) for a in args]
    before = tree_hashes(workdir)
    done = _run(args)
    assert done.returncode == 2, f"{name}: exit {done.returncode}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert needle in lines[0], lines[0]
    assert tree_hashes(workdir) == before
    assert not (tmp_path / "fresh" / "config.gin").exists()


def test_there_are_at_least_forty():
    assert len(MISTAKES) >= 40
