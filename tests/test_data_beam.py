"""`prepare` on Apache Beam (DirectRunner, several worker processes) makes the folder the
in-process path makes: the same records in the same shards, the same leaf table and manifest."""

import json
import os
import subprocess
import sys

import pytest
from helpers.small import tree_hashes

from hmem_jax.main.common import load_train_config

pytestmark = pytest.mark.extras  # tests/run_extras.sh
pytest.importorskip("apache_beam", reason="the 'beam' extra is not installed")

DIRECT = [
    "--runner=DirectRunner",
    "--direct_num_workers=2",
    "--direct_running_mode=multi_processing",
]


def _manifest_without_timings(folder):
    manifest = json.loads(open(os.path.join(folder, "manifest.json")).read())
    for varying in ("created", "timing_s"):  # when and how fast it was made
        manifest.pop(varying)
    return manifest


def _assert_same_folders(beam_out, local_out):
    manifest = "manifest.json"
    assert {k: v for k, v in tree_hashes(beam_out).items() if k != manifest} == {
        k: v for k, v in tree_hashes(local_out).items() if k != manifest
    }
    assert _manifest_without_timings(beam_out) == _manifest_without_timings(local_out)


@pytest.mark.ci
def test_beam_prepares_the_embedded_corpus_as_the_in_process_path_does(
    small_prepared_tree_data, tmp_path
):
    from hmem_jax.data.beam_prepare import prepare_with_beam

    prepared, tree, params = small_prepared_tree_data
    cfg = load_train_config((), params)
    out = str(tmp_path / "beam")
    prepare_with_beam(cfg.data, cfg.seq_len, out, tree, DIRECT)
    _assert_same_folders(out, prepared)


@pytest.mark.ci
def test_beam_prepares_a_jsonl_corpus_of_many_files_into_the_same_shards(
    small_prepared_tree_data, tmp_path, monkeypatch, caplog
):
    """Several files (units read by different workers), malformed and empty lines (counted
    alike), a document longer than a sequence, and shards small enough that there are many."""
    from hmem_jax.data import encyclopedia, packing
    from hmem_jax.data.beam_prepare import prepare_with_beam
    from hmem_jax.data.prepare import prepare

    _, tree, params = small_prepared_tree_data
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    documents = encyclopedia.generate_corpus(200, seed=0).documents
    for number in range(5):
        lines = [json.dumps({"id": d.id, "text": d.text}) for d in documents[number::5]]
        lines[3:3] = ["{not json", json.dumps({"text": ""}), json.dumps({"id": 7})]
        if number == 2:
            lines.append(json.dumps({"text": " ".join(d.text for d in documents[:40])}))
        (corpus / f"part-{number}.jsonl").write_text("\n".join(lines) + "\n")
    cfg = load_train_config(
        (),
        params
        + (
            "DataConfig.source = 'jsonl'",
            f"DataConfig.path = '{corpus}'",
            "DataConfig.max_document_chars = 2000",
        ),
    )
    monkeypatch.setattr(packing, "_SHARD_TARGET_BYTES", 40 * cfg.seq_len * 4)  # 40 records
    local, beam = str(tmp_path / "local"), str(tmp_path / "beam")
    prepare(cfg.data, cfg.seq_len, local, tree_dir=tree, progress=False)
    with caplog.at_level("INFO"):
        prepare_with_beam(cfg.data, cfg.seq_len, beam, tree, DIRECT)
    _assert_same_folders(beam, local)
    manifest = _manifest_without_timings(beam)
    # Beam's own counters, summed over the workers, agree with the manifest.
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Beam metrics")]
    metrics = json.loads(logged[-1].split(": ", 1)[1])
    leaves = manifest["leaves"]
    assert metrics["documents"] == manifest["num_documents"]
    assert metrics["malformed_skipped"] == 10 and metrics["leaves"] == leaves["count"]
    assert metrics["sequences"] == manifest["num_records"]
    assert metrics["leaf_tokens"]["max"] == max(leaves["tokens"])
    assert metrics["leaf_documents"]["min"] == min(leaves["documents"])
    assert len(manifest["shards"]) > 3
    assert (
        manifest["corpus"]["malformed_skipped"] == 10 and manifest["corpus"]["empty_skipped"] == 5
    )
    assert manifest["corpus"]["huge_split"] == 1


@pytest.mark.slow
@pytest.mark.ci
def test_the_prepare_command_runs_the_pipeline_and_a_run_trains_on_its_data(
    small_prepared_tree_data, tmp_path
):
    from helpers.small import run_entry_point
    from helpers.training import MEMORY_BINDINGS

    prepared, tree, params = small_prepared_tree_data
    out = tmp_path / "beam"
    data_params = tuple(p for p in params if not p.startswith("DataConfig.prepared_dir"))
    command = [sys.executable, "-m", "hmem_jax.main.prepare", f"--out={out}", f"--tree={tree}"]
    command += ["--quiet", "--beam_runner=DirectRunner"]
    command += [f"--beam_option={option}" for option in DIRECT[1:]]
    command += [f"--gin_param={p}" for p in data_params]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        json.loads(done.stdout)["num_records"] == _manifest_without_timings(prepared)["num_records"]
    )
    _assert_same_folders(str(out), prepared)
    run = tmp_path / "run"
    trained = run_entry_point(
        "hmem_jax.main.train",
        run,
        data_params + MEMORY_BINDINGS + (f"DataConfig.prepared_dir = '{out}'",),
        1,
        "--probe_limit=0",
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in open(run / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_a_failed_pipeline_leaves_no_folder_that_looks_prepared(
    small_prepared_tree_data, tmp_path, monkeypatch
):
    """A worker that fails midway (here: reading the third file) fails the pipeline; neither
    the output folder nor its staging folder is left behind."""
    from hmem_jax.data import beam_prepare, encyclopedia

    _, tree, params = small_prepared_tree_data
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    documents = encyclopedia.generate_corpus(60, seed=0).documents
    for number in range(4):
        rows = [json.dumps({"text": d.text}) for d in documents[number::4]]
        (corpus / f"part-{number}.jsonl").write_text("\n".join(rows) + "\n")
    cfg = load_train_config(
        (), params + ("DataConfig.source = 'jsonl'", f"DataConfig.path = '{corpus}'")
    )
    original = beam_prepare.read_unit

    def failing(data, unit, stats):
        if unit.endswith("part-2.jsonl"):
            raise OSError("the disk went away")
        return original(data, unit, stats)

    monkeypatch.setattr(beam_prepare, "read_unit", failing)
    out = tmp_path / "out" / "beam"
    with pytest.raises(Exception, match="the disk went away"):
        beam_prepare.prepare_with_beam(
            cfg.data, cfg.seq_len, str(out), tree, ["--runner=DirectRunner"]
        )
    assert not out.exists() and os.listdir(out.parent) == []


def test_beam_reads_a_corpus_pattern_on_s3_and_writes_its_output_there(
    small_prepared_tree_data, tmp_path
):
    """Source shards (plain, gzip, zstandard) matched by a pattern on an S3-compatible server,
    output folder on it too: the workers write the shards into the bucket, the manifest comes
    last, and the folder equals the in-process preparation of a local copy of the corpus."""
    from helpers.object_store import s3_environment, upload_jsonl_corpus

    from hmem_jax import paths
    from hmem_jax.data import encyclopedia
    from hmem_jax.data.prepare import ensure_prepared, prepare

    _, tree, params = small_prepared_tree_data
    documents = encyclopedia.generate_corpus(120, seed=1).documents
    local_corpus = tmp_path / "corpus"
    local_corpus.mkdir()
    with s3_environment("hmem-beam") as (_, client):
        for name, data in upload_jsonl_corpus(client, "hmem-beam", "in", documents).items():
            (local_corpus / name).write_bytes(data)
        pattern, out = "s3://hmem-beam/in/part-*.jsonl*", "s3://hmem-beam/out/data"
        cfg = load_train_config(
            (), params + ("DataConfig.source = 'jsonl'", f"DataConfig.path = '{pattern}'")
        )
        assert ensure_prepared(cfg, out, tree, beam_args=DIRECT) == out
        keys = [item["Key"] for item in client.list_objects_v2(Bucket="hmem-beam")["Contents"]]
        assert not any("_beam_parts" in key for key in keys)
        downloaded = tmp_path / "downloaded"
        paths.download_tree(out, str(downloaded))
    local = load_train_config(
        (), params + ("DataConfig.source = 'jsonl'", f"DataConfig.path = '{local_corpus}'")
    )
    local_out = tmp_path / "local"
    prepare(local.data, local.seq_len, str(local_out), tree_dir=tree, progress=False)
    beam_manifest, local_manifest = (
        _manifest_without_timings(folder) for folder in (downloaded, local_out)
    )
    for manifest in (beam_manifest, local_manifest):  # all but the corpus's path are equal
        assert manifest.pop("source") == manifest["settings"].pop("source")
    assert beam_manifest == local_manifest
    assert {k: v for k, v in tree_hashes(downloaded).items() if k != "manifest.json"} == {
        k: v for k, v in tree_hashes(local_out).items() if k != "manifest.json"
    }
