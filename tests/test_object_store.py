"""Object-store paths (hmem_jax/paths.py) against a real S3-compatible server on loopback.

A moto server (`python -m moto.server`) stands in for S3: AWS_ENDPOINT_URL points at it, the
credentials are dummies. Nothing here needs the network.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from helpers.bank import KILL_MID_WRITE_BACK, streamed_bank
from helpers.object_store import moto_server, s3_environment, upload_jsonl_corpus
from helpers.small import run_entry_point, tree_hashes
from helpers.training import MEMORY_BINDINGS, memory_config

from hmem_jax import paths
from hmem_jax.errors import HmemError

BUCKET = "hmem-test"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server with bucket BUCKET, the AWS_* variables pointing at it (module-wide)."""
    with s3_environment(BUCKET) as server:
        yield server


def test_paths_read_and_write_objects_and_make_kvstore_specs(s3_server):
    endpoint, _ = s3_server
    url = f"s3://{BUCKET}/paths/hello.txt"
    assert paths.is_remote(url) and not paths.is_remote("/tmp/x")
    assert paths.absolute(url) == url and paths.join(f"s3://{BUCKET}", "a", "b") == (
        f"s3://{BUCKET}/a/b"
    )
    paths.write_text(url, "hi")
    assert paths.read_text(url) == "hi" and paths.exists(url) and paths.isfile(url)
    spec = paths.kvstore_spec(f"s3://{BUCKET}/bank")
    assert spec["endpoint"] == endpoint and spec["path"] == "bank/"
    assert spec["aws_region"] == "us-east-1"
    assert spec["aws_credentials"] == {"type": "environment"}  # no ~/.aws lookups, no noise
    paths.check_kvstore(spec, "bank")


def test_a_missing_bucket_and_a_closed_port_are_one_line_errors_without_hanging(
    s3_server, monkeypatch
):
    import portpicker

    spec = paths.kvstore_spec("s3://hmem-no-such-bucket/bank")
    with pytest.raises(paths.ObjectStoreError, match="bucket does not exist"):
        paths.check_kvstore(spec, "bank")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{portpicker.pick_unused_port()}")
    start = time.time()
    with pytest.raises(paths.ObjectStoreError, match="cannot be reached.*AWS_ENDPOINT_URL"):
        paths.check_kvstore(paths.kvstore_spec(f"s3://{BUCKET}/bank"), "bank")
    assert time.time() - start < 20


def test_missing_and_refused_credentials_are_one_line_errors(s3_server, tmp_path, monkeypatch):
    """No credentials anywhere: refused before any request (tensorstore would print its search
    of the credential chain). Credentials an auth-checking server does not know: refused."""
    spec = paths.kvstore_spec(f"s3://{BUCKET}/bank")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aws
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # and no instance role to ask
    paths._aws_credentials_found.cache_clear()
    try:
        with pytest.raises(paths.ObjectStoreError, match="bank: no AWS credentials were found"):
            paths.check_kvstore(paths.kvstore_spec(f"s3://{BUCKET}/bank"), "bank")
    finally:
        paths._aws_credentials_found.cache_clear()

    with moto_server({"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as endpoint:  # checks signatures
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "unknown-key")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unknown-secret")
        spec = {**spec, "endpoint": endpoint}
        with pytest.raises(paths.ObjectStoreError, match="refused the credentials.*AWS_ACCESS"):
            paths.check_kvstore(spec, "bank")


def test_the_train_command_names_a_missing_bucket_in_one_line(
    s3_server, small_prepared_tree_data, tmp_path
):
    """Before anything is written: exit 2, one line on stderr (no credential-file noise)."""
    _, _, params = small_prepared_tree_data
    params = (
        params
        + MEMORY_BINDINGS
        + (
            "MemoryConfig.bank_tier = 'streaming'",
            "MemoryConfig.bank_store = 's3://hmem-no-such-bucket/bank'",
        )
    )
    done = run_entry_point("hmem_jax.main.train", tmp_path / "run", params, 1, "--probe_limit=0")
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "bucket does not exist" in lines[0], done.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_every_object_store_a_run_names_is_checked_before_it_starts(
    s3_server, small_prepared_tree_data
):
    """The workdir, prepared data, tree and anchor on a missing bucket: one line naming the
    setting, from check_paths (before anything is fitted, prepared or written)."""
    from hmem_jax.train.layout import check_paths

    _, _, params = small_prepared_tree_data
    cfg = memory_config(params)
    check_paths(cfg, f"s3://{BUCKET}/run")  # the bucket answers
    missing = "s3://hmem-no-such-bucket"
    with pytest.raises(HmemError, match="--workdir=s3://hmem-no-such-bucket/run.*bucket"):
        check_paths(cfg, f"{missing}/run")
    remote_data = dataclasses.replace(cfg.data, prepared_dir=f"{missing}/data")
    for field, cfg in (
        ("DataConfig.prepared_dir", memory_config(params, data=remote_data)),
        ("TrainConfig.tree_dir", memory_config(params, tree_dir=f"{missing}/tree")),
        (
            "TrainConfig.init_from",
            memory_config(params, init_from=f"{missing}/anchor", memory={"mode": "cotrain"}),
        ),
    ):
        with pytest.raises(HmemError, match=f"{field}=.*bucket does not exist"):
            check_paths(cfg, "/tmp/run")


def test_checkpoints_on_s3_commit_restore_and_pass_over_an_unfinished_save(s3_server):
    """orbax writes checkpoints to S3 (tensorstore's s3 driver) and marks each complete one
    with its commit file; a step folder without one (a save killed midway) is not a checkpoint.
    The newest state and an older step's parameters (as `init_from` reads them) restore."""
    import jax
    import jax.numpy as jnp

    from hmem_jax.train.checkpoint import Checkpointer

    _, client = s3_server
    directory = f"s3://{BUCKET}/ckpt"
    state = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "opt_state": {"m": jnp.ones(3)}}
    saver = Checkpointer(directory, every=1, keep=2)
    for step in (1, 2, 3):
        saver.save(step, jax.tree.map(lambda x, s=step: x * s, state), {"step": step})
    saver.close()
    assert _committed_steps(client, "ckpt") == [2, 3]
    client.put_object(Bucket=BUCKET, Key="ckpt/4/state/_METADATA", Body=b"{}")
    reader = Checkpointer(directory, every=1, keep=2, async_save=False)
    try:
        assert reader.all_steps() == [2, 3] and reader.read_record(3)["step"] == 3
        step, restored, skipped = reader.restore_newest(state)
        assert (step, skipped) == (3, [])
        np.testing.assert_array_equal(restored["params"]["w"], 3 * state["params"]["w"])
        np.testing.assert_array_equal(restored["opt_state"]["m"], 3 * state["opt_state"]["m"])
    finally:
        reader.close()
    anchor = Checkpointer(directory, every=1, keep=1 << 30, async_save=False)  # as init_from
    try:
        params = anchor.restore_params(2, state["params"])
        np.testing.assert_array_equal(params["w"], 2 * state["params"]["w"])
    finally:
        anchor.close()


def test_a_tree_and_prepared_data_written_to_s3_equal_local_ones(
    s3_server, small_prepared_tree_data, tmp_path, monkeypatch
):
    """cluster and prepare write an S3 folder (its manifest last); a host's local copy of the
    S3 data holds the files a local preparation writes, and is made once."""
    from hmem_jax.data.prepare import ensure_prepared
    from hmem_jax.data.prepared import local_copy
    from hmem_jax.hierarchy.corpus import cluster_corpus
    from hmem_jax.hierarchy.tree import ClusterTree
    from hmem_jax.main.common import load_train_config

    monkeypatch.setenv("HMEM_JAX_CACHE", str(tmp_path / "cache"))
    prepared, tree, params = small_prepared_tree_data
    cfg = load_train_config((), params)
    remote_tree, remote_data = f"s3://{BUCKET}/fit/tree", f"s3://{BUCKET}/fit/data"
    cluster_corpus(cfg.data, cfg.hierarchy, remote_tree, verbose=False)
    assert ClusterTree.load(remote_tree).content_hash == ClusterTree.load(tree).content_hash
    assert ensure_prepared(cfg, remote_data, remote_tree, progress=False) == remote_data
    copy = local_copy(remote_data)
    assert copy.startswith(str(tmp_path / "cache")) and local_copy(remote_data) == copy
    manifest = "manifest.json"
    assert {k: v for k, v in tree_hashes(copy).items() if k != manifest} == {
        k: v for k, v in tree_hashes(prepared).items() if k != manifest
    }
    made, local = (json.loads(open(os.path.join(d, manifest)).read()) for d in (copy, prepared))
    for varying in ("created", "timing_s"):  # when and how fast it was made
        made.pop(varying), local.pop(varying)
    assert made == local
    assert ensure_prepared(cfg, remote_data, remote_tree, progress=False) == remote_data  # reused


def test_a_corpus_pattern_on_s3_reads_and_prepares_like_its_local_copy(
    s3_server, small_prepared_tree_data, tmp_path
):
    """DataConfig.path = 's3://.../part-*.jsonl*': compressed and plain shards are read in name
    order from the object store, and prepare makes the folder a local copy of them makes."""
    from hmem_jax.data import encyclopedia
    from hmem_jax.data.prepare import prepare
    from hmem_jax.data.sources import read_documents, source_units
    from hmem_jax.main.common import load_train_config

    _, tree, params = small_prepared_tree_data
    _, client = s3_server
    documents = encyclopedia.generate_corpus(120, seed=1).documents
    local_corpus = tmp_path / "corpus"
    local_corpus.mkdir()
    for name, data in upload_jsonl_corpus(client, BUCKET, "corpus", documents).items():
        (local_corpus / name).write_bytes(data)

    def config(path):
        extra = ("DataConfig.source = 'jsonl'", f"DataConfig.path = '{path}'")
        return load_train_config((), params + extra)

    remote, local = config(f"s3://{BUCKET}/corpus/part-*.jsonl*"), config(local_corpus)
    assert [u.rsplit("/", 1)[1] for u in source_units(remote.data)] == [
        "part-0.jsonl",
        "part-1.jsonl.gz",
        "part-2.jsonl.zst",
        "part-3.jsonl",
    ]
    assert list(read_documents(remote.data)) == list(read_documents(local.data))
    remote_out, local_out = tmp_path / "from_s3", tmp_path / "from_local"
    prepare(remote.data, remote.seq_len, str(remote_out), tree_dir=tree, progress=False)
    prepare(local.data, local.seq_len, str(local_out), tree_dir=tree, progress=False)
    manifest = "manifest.json"
    assert {k: v for k, v in tree_hashes(remote_out).items() if k != manifest} == {
        k: v for k, v in tree_hashes(local_out).items() if k != manifest
    }


def test_the_embedding_cache_on_s3_is_read_back_without_re_embedding(s3_server):
    from hmem_jax.hierarchy import embed_cached, get_embedder

    class Counting:
        def __init__(self):
            self.inner, self.embedded = get_embedder("hashed"), 0
            self.name, self.dim, self.version = self.inner.name, self.inner.dim, "1"

        def embed(self, texts):
            self.embedded += len(texts)
            return self.inner.embed(texts)

    texts = ["alpha beta", "gamma delta", "epsilon"]
    first, second = Counting(), Counting()
    cache = f"s3://{BUCKET}/embedding-cache"
    stored = embed_cached(first, texts, cache)
    again = embed_cached(second, texts, cache)
    assert (first.embedded, second.embedded) == (3, 0)
    np.testing.assert_array_equal(stored, again)
    assert sorted(name.rsplit(".", 1)[1] for name in paths.find_files(cache)) == ["json", "npy"]


KILLED_CLI = (
    textwrap.dedent("""
    import os, signal, sys

""")
    + KILL_MID_WRITE_BACK
    + textwrap.dedent("""
    from hmem_jax.main import train as entry
    sys.argv = ["hmem_jax.main.train", *sys.argv[1:]]
    entry.run()
    print("NOT KILLED")
""")
)


def _losses(workdir):
    """step -> train/loss of metrics.jsonl (the resumed run's row wins)."""
    out = {}
    for line in paths.read_text(paths.join(str(workdir), "metrics.jsonl")).splitlines():
        row = json.loads(line)
        out[row["step"]] = row["train/loss"]
    return out


def _committed_steps(client, prefix):
    """Steps under s3://BUCKET/PREFIX/ that orbax committed (their commit_success.txt)."""
    listing = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")
    keys = [item["Key"][len(prefix) + 1 :].split("/") for item in listing.get("Contents", [])]
    return sorted(int(k[0]) for k in keys if k[1:] == ["commit_success.txt"])


@pytest.mark.slow
@pytest.mark.ci
def test_a_run_all_on_s3_survives_kill_9_and_matches_a_local_run(
    tmp_path, s3_server, small_prepared_tree_data, monkeypatch
):
    """The CLI trains a streamed-bank memory run whose workdir (checkpoints, metrics, lease,
    bank), prepared data and tree are all on S3; it is killed (SIGKILL) mid write-back after the
    step-3 checkpoint, and a second start resumes to the end with the losses and bank of an
    uninterrupted run that kept everything on the local disk. evaluate and export then read the
    S3 workdir and write their outputs to S3."""
    _, client = s3_server
    monkeypatch.setenv("HMEM_JAX_CACHE", str(tmp_path / "cache"))  # the local copy of the data
    prepared, tree, params = small_prepared_tree_data
    paths.upload_tree(tree, f"s3://{BUCKET}/tree")
    paths.upload_tree(prepared, f"s3://{BUCKET}/data", last=("manifest.json",))
    memory = {"bank_tier": "streaming", "prefetch_steps": 1}
    reference_cfg = memory_config(params, memory=memory)
    local_params = (
        *params,
        *MEMORY_BINDINGS,
        "MemoryConfig.bank_tier = 'streaming'",
        "MemoryConfig.prefetch_steps = 1",
    )
    remote_params = tuple(
        p for p in local_params if not p.startswith(("TrainConfig.tree_dir", "DataConfig.prep"))
    ) + (
        f"TrainConfig.tree_dir = 's3://{BUCKET}/tree'",
        f"DataConfig.prepared_dir = 's3://{BUCKET}/data'",
    )
    reference = run_entry_point(
        "hmem_jax.main.train", tmp_path / "local", local_params, 1, "--probe_limit=0"
    )
    assert reference.returncode == 0, reference.stdout + reference.stderr
    workdir = f"s3://{BUCKET}/run"
    flags = [f"--workdir={workdir}", "--probe_limit=0"]
    flags += [f"--gin_param={p}" for p in remote_params]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")  # as below
    child = subprocess.run(
        [sys.executable, "-c", KILLED_CLI, *flags],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    assert _committed_steps(client, "run/checkpoints") == [3]
    assert paths.isfile(f"{workdir}/trainer.lock")  # left by the killed job: stale at once

    resumed = run_entry_point("hmem_jax.main.train", workdir, remote_params, 1, "--probe_limit=0")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert _committed_steps(client, "run/checkpoints") == [3, 6]
    assert not paths.exists(f"{workdir}/trainer.lock")
    losses = _losses(workdir)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses == _losses(tmp_path / "local")
    local = streamed_bank(reference_cfg, paths.kvstore_spec(str(tmp_path / "local" / "bank")))
    remote = streamed_bank(reference_cfg, paths.kvstore_spec(f"{workdir}/bank"))
    for key, fields in local.items():
        for field, value in fields.items():
            np.testing.assert_array_equal(remote[key][field], value, err_msg=f"{key} {field}")

    evaluated = run_entry_point(
        "hmem_jax.main.evaluate", workdir, (), 1, "--limit=5", f"--out={workdir}/eval"
    )
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    assert json.loads(paths.read_text(f"{workdir}/eval/results.json"))["probe"]
    pytest.importorskip("safetensors", reason="export needs the 'hf' extra")
    exported = run_entry_point(
        "hmem_jax.main.export",
        workdir,
        (),
        1,
        f"--out={workdir}/hf",
        "--memory=fetched",
        "--path=1,2",
    )
    assert exported.returncode == 0, exported.stdout + exported.stderr
    record = json.loads(paths.read_text(f"{workdir}/hf/hmem_export.json"))
    assert record["block_ids"] == [1, 6]  # the blocks of path 1,2, read from the S3 bank
