"""User mistakes end an entry point with one line and exit status 2; faults keep their traceback."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from helpers.small import tree_hashes

from hmem_jax import errors

ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")


def _run(args, timeout=300):
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=ENV
    )


def _one_line(done, *needles):
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_every_user_error_is_an_hmem_error_and_keeps_its_builtin_base():
    for name in (
        "ConfigError",
        "SourceError",
        "TokenizerError",
        "PreparedDataError",
        "DataMismatchError",
        "ProbeFileError",
        "UnsupportedCheckpointError",
        "TreeError",
        "InputFileError",
        "MemoryModeError",
        "UnsupportedExportError",
    ):
        cls = getattr(errors, name)
        assert issubclass(cls, errors.HmemError) and issubclass(cls, ValueError), name
    for name in (
        "CheckpointMismatchError",
        "CheckpointSaveError",
        "BankStoreError",
        "BankMismatchError",
        "BankCorruptionError",
    ):
        cls = getattr(errors, name)
        assert issubclass(cls, errors.HmemError) and issubclass(cls, RuntimeError), name
    for name in ("MissingPathError", "RunLayoutError"):
        cls = getattr(errors, name)
        assert issubclass(cls, errors.HmemError) and issubclass(cls, FileNotFoundError), name
    assert issubclass(errors.RunLayoutError, errors.MissingPathError)
    assert issubclass(errors.MissingExtraError, errors.HmemError)
    assert issubclass(errors.MissingExtraError, ImportError)
    from hmem_jax.bank.store import BankMismatchError
    from hmem_jax.config import ConfigError
    from hmem_jax.data.loader import DataMismatchError

    assert (ConfigError, BankMismatchError, DataMismatchError) == (
        errors.ConfigError,
        errors.BankMismatchError,
        errors.DataMismatchError,
    )


@pytest.mark.parametrize(
    "params, needle",
    [
        (
            (
                "DataConfig.source = 'jsonl'",
                "DataConfig.path = '/no/such/corpus.jsonl'",
                "MemoryConfig.kind = 'none'",
            ),
            "DataConfig.path",
        ),
        (
            (
                "DataConfig.tokenizer_path = '/no/such/tokenizer.model'",
                "MemoryConfig.kind = 'none'",
            ),
            "DataConfig.tokenizer_path",
        ),
        (
            ("MemoryConfig.kind = 'ffn'", "MemoryConfig.level_sizes = ()"),
            "MemoryConfig.level_sizes",
        ),
    ],
    ids=["missing-corpus", "missing-tokenizer", "bad-value"],
)
def test_train_reports_a_user_mistake_in_one_line(tmp_path, params, needle):
    done = _run(
        ["-m", "hmem_jax.main.train", f"--workdir={tmp_path / 'run'}", "--probe_limit=0"]
        + [f"--gin_param={p}" for p in params]
    )
    _one_line(done, needle)


@pytest.mark.parametrize(
    "command, needle",
    [
        (("hmem_jax.main.evaluate", "--workdir={tmp}"), "no config.gin"),
        (
            ("hmem_jax.main.generate", "--workdir={tmp}", "--prompts_file={tmp}/prompts.txt"),
            "--prompts_file=",
        ),
        (("hmem_jax.main.generate", "--workdir={tmp}", "--prompt=x", "--top_p=0"), "top_p"),
        (("hmem_jax.main.export", "--workdir={tmp}", "--out={tmp}/hf"), "no config.gin"),
        (("hmem_jax.main.import_hf", "--hf_dir={tmp}", "--out={tmp}/anchor"), "config.json"),
        (("hmem_jax.main.prepare", "--out={tmp}/data", "--tree={tmp}"), "tree.json"),
    ],
    ids=["no-run", "no-prompts-file", "bad-sampling", "export-no-run", "no-hf-config", "no-tree"],
)
def test_a_missing_path_or_bad_value_is_one_line_in_every_command(tmp_path, command, needle):
    module, *flags = command
    _one_line(_run(["-m", module, *(f.format(tmp=tmp_path) for f in flags)]), needle)


def test_prompt_task_and_document_files_name_the_file_and_line(tmp_path):
    from hmem_jax.infer.inputs import read_documents, read_prompts
    from hmem_jax.infer.tasks import read_task

    with pytest.raises(errors.MissingPathError, match="no such file"):
        read_prompts(str(tmp_path / "missing.txt"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "The atomic number of Zorium is"}\n{"text": "x"}\n')
    with pytest.raises(errors.InputFileError, match=r"prompts.jsonl:2: .*\"prompt\""):
        read_prompts(str(prompts))
    task = tmp_path / "task.jsonl"
    task.write_text('{"question": "2 plus 2 is", "choices": ["3", "4"], "answer": 2}\n')
    with pytest.raises(errors.InputFileError, match=r"task.jsonl:1: 'answer' must be the index"):
        read_task(str(task))
    task.write_text("{not json\n")
    with pytest.raises(errors.InputFileError, match=r"task.jsonl:1: not JSON"):
        read_task(str(task))
    documents = tmp_path / "documents.jsonl"
    documents.write_text('{"text": "a", "bucket": 0}\n{"body": "b"}\n')
    with pytest.raises(errors.InputFileError, match=r"documents.jsonl:2: needs a \"text\""):
        read_documents(str(documents))


def test_a_damaged_tree_folder_is_a_tree_error(tmp_path):
    import numpy as np

    from hmem_jax.config import HierarchyConfig
    from hmem_jax.hierarchy.tree import ClusterTree

    points = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    config = HierarchyConfig(branching=4, depth=2, samples_per_step=64)
    ClusterTree.fit(points, config, "hashed").save(tmp_path)
    with open(tmp_path / "centroids_level2.npy", "r+b") as handle:
        handle.truncate(100)
    with pytest.raises(errors.TreeError, match="cannot be read.*restore it or re-fit"):
        ClusterTree.load(tmp_path)
    (tmp_path / "tree.json").write_text("{")
    with pytest.raises(errors.TreeError, match="tree.json is not JSON"):
        ClusterTree.load(tmp_path)


def test_stray_arguments_are_refused_in_one_line_with_the_commands_hint(tmp_path):
    done = _run(["-m", "hmem_jax.main.generate", f"--workdir={tmp_path}", "The atomic number"])
    _one_line(done, "Unexpected arguments", "--prompt")


ENTRY = textwrap.dedent("""
    import sys
    from hmem_jax.main import common

    def missing_extra(argv):
        sys.modules["safetensors"] = None  # as in an install without the hf extra
        import safetensors  # noqa: F401

    def missing_core(argv):
        import hmem_jax_no_such_module  # noqa: F401

    def fault(argv):
        raise RuntimeError("an internal fault")

    common.run({"extra": missing_extra, "core": missing_core, "fault": fault}[sys.argv.pop(1)])
""")


def test_a_missing_extra_names_the_extra_to_install_and_faults_keep_their_traceback():
    _one_line(_run(["-c", ENTRY, "extra"]), "safetensors", 'pip install -e ".[hf]"')
    for kind, message in (("core", "hmem_jax_no_such_module"), ("fault", "an internal fault")):
        done = _run(["-c", ENTRY, kind])
        assert done.returncode != 0 and "Traceback" in done.stderr, done.stderr[-2000:]
        assert message in done.stderr


def test_a_refused_resume_or_a_mesh_that_does_not_fit_changes_nothing(
    tmp_path, small_prepared_data
):
    """A resume with another d_model stops in one line before writing anything: the run's
    config and checkpoints stay byte for byte; a mesh that does not fit is refused first."""
    _, params = small_prepared_data
    params = params + (
        "MemoryConfig.kind = 'none'",
        "TrainConfig.steps = 2",
        "TrainConfig.batch_size = 4",
        "TrainConfig.checkpoint_every = 2",
    )
    workdir = tmp_path / "run"
    train = ["-m", "hmem_jax.main.train", f"--workdir={workdir}", "--probe_limit=0"]
    done = _run(train + [f"--gin_param={p}" for p in params])
    assert done.returncode == 0, done.stderr[-3000:]
    before = tree_hashes(workdir)
    assert "config.gin" in before and any(k.startswith("checkpoints/") for k in before)

    changed = params + ("model_preset.d_model = 32",)
    _one_line(_run(train + [f"--gin_param={p}" for p in changed]), "model", "fresh --workdir")
    assert tree_hashes(workdir) == before

    fresh = tmp_path / "fresh"
    mesh = params + ("MeshConfig.data = 3", "MeshConfig.fsdp = 1")
    done = _run(
        ["-m", "hmem_jax.main.train", f"--workdir={fresh}", "--probe_limit=0"]
        + [f"--gin_param={p}" for p in mesh]
    )
    _one_line(done, "MeshConfig", "devices")
    assert not fresh.exists() or not any(fresh.iterdir())


def test_export_refuses_a_folder_that_holds_files(tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    done = _run(["-m", "hmem_jax.main.export", f"--workdir={tmp_path / 'run'}", f"--out={out}"])
    _one_line(done, "--out=", "config.json", "--overwrite")
    assert (out / "config.json").read_text() == '{"mine": true}'


def _truncate_arrays(step_dir):
    for folder, _, files in os.walk(step_dir / "state"):
        for name in files:
            if "/d" in folder.replace(str(step_dir), ""):
                path = os.path.join(folder, name)
                with open(path, "r+b") as handle:
                    handle.truncate(max(1, os.path.getsize(path) // 3))


def _junk(step_dir):
    import shutil

    shutil.rmtree(step_dir)
    step_dir.mkdir()
    (step_dir / "notes.txt").write_text("not a checkpoint")


DAMAGE_PARAMS = (
    "MemoryConfig.kind = 'none'",
    "TrainConfig.steps = 6",
    "TrainConfig.batch_size = 4",
    "TrainConfig.checkpoint_every = 2",
    "TrainConfig.log_every = 1",
)


@pytest.fixture(scope="module")
def runs_to_damage(tmp_path_factory, small_prepared_data):
    """(train command, a run of 6 steps, a run stopped after step 4 with checkpoints 2 and 4)."""
    _, params = small_prepared_data
    root = tmp_path_factory.mktemp("damage")
    train = ["-m", "hmem_jax.main.train", "--probe_limit=0"]
    train += [f"--gin_param={p}" for p in params + DAMAGE_PARAMS]
    assert _run([*train, f"--workdir={root / 'whole'}"]).returncode == 0
    assert _run([*train, f"--workdir={root / 'stopped'}", "--until_step=4"]).returncode == 0
    return train, root / "whole", root / "stopped"


@pytest.mark.parametrize(
    "damage",
    [_truncate_arrays, lambda d: os.remove(d / "record" / "metadata"), _junk],
    ids=["truncated-arrays", "missing-record", "junk-folder"],
)
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_readable(
    tmp_path, runs_to_damage, damage
):
    """Checkpoints 2 and 4, the 4th damaged: training resumes from 2 with a warning naming the
    bad folder, keeps that folder byte for byte as 4.unreadable, and ends as a run never
    interrupted would; generate reads the newest readable checkpoint too."""
    import shutil

    train, whole, stopped = runs_to_damage
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    bad = run / "checkpoints" / "4"
    damage(bad)
    damaged = tree_hashes(bad)

    if damage is _truncate_arrays:
        generate = ["-m", "hmem_jax.main.generate", f"--workdir={run}", "--prompt=The"]
        done = _run([*generate, "--max_new_tokens=2", "--memory=none"])
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"checkpoint {bad} cannot be read" in done.stderr and "Traceback" not in done.stderr

    done = _run([*train, f"--workdir={run}"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"checkpoint {bad} cannot be read" in done.stderr and "Traceback" not in done.stderr
    assert "resuming from step 2" in done.stdout
    assert tree_hashes(run / "checkpoints" / "4.unreadable") == damaged
    losses = lambda w: {  # noqa: E731
        r["step"]: r["train/loss"] for r in map(json.loads, open(w / "metrics.jsonl"))
    }
    assert losses(run)[6] == losses(whole)[6] and losses(run)[4] == losses(whole)[4]


def _small_file_limit():
    """In the child: writes past 200 kB fail (EFBIG), as on a disk that has filled up."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_a_checkpoint_that_cannot_be_written_stops_the_run_in_one_line(tmp_path, runs_to_damage):
    """The final save fails (no room for its files): one line naming the last complete
    checkpoint, which stays intact, and rerunning the command resumes from it to the end."""
    import shutil

    train, whole, stopped = runs_to_damage
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    kept = tree_hashes(run / "checkpoints" / "4")
    done = subprocess.run(
        [sys.executable, *train, f"--workdir={run}"],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
        preexec_fn=_small_file_limit,
    )
    _one_line(
        done, "Writing a checkpoint", "File too large", "newest complete checkpoint is step 4"
    )
    assert tree_hashes(run / "checkpoints" / "4") == kept
    done = _run([*train, f"--workdir={run}"])
    assert done.returncode == 0, done.stderr[-3000:]
    losses = lambda w: {  # noqa: E731
        r["step"]: r["train/loss"] for r in map(json.loads, open(w / "metrics.jsonl"))
    }
    assert losses(run)[6] == losses(whole)[6]


def test_verbose_adds_the_traceback_below_the_same_one_line_error(tmp_path):
    args = [
        "-m",
        "hmem_jax.main.train",
        f"--workdir={tmp_path}",
        "--gin_param=TrainConfig.steps = 2.5",
    ]
    _one_line(_run(args), "TrainConfig.steps = 2.5 must be an int")
    done = _run([*args, "--verbose"])
    assert done.returncode == 2 and "Traceback" in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "error: TrainConfig.steps = 2.5 must be an int."


def test_a_failed_write_is_explained_by_the_operating_systems_reason():
    """tensorstore names the errno only inside a long spec; an OSError carries it itself."""
    from hmem_jax.train.checkpoint import _save_failure

    wrapped = ValueError("writing {" + '"spec": 1, ' * 60 + "} failed [os_error_code='27']")
    assert _save_failure(wrapped).startswith("File too large: ...")
    try:
        raise RuntimeError("commit failed") from OSError(28, "No space left on device", "/ckpt/4")
    except RuntimeError as err:
        assert _save_failure(err).startswith("No space left on device: ")
    assert _save_failure(KeyError("x")) == "'x'"
