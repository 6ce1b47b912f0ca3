"""Object-store paths (hmem_jax/paths.py) against a real S3-compatible server on loopback.

A moto server (`python -m moto.server`) stands in for S3: AWS_ENDPOINT_URL points at it, the
credentials are dummies. Nothing here needs the network.
"""

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
from helpers.small import run_entry_point
from helpers.training import MEMORY_BINDINGS, memory_config

from hmem_jax import paths
from hmem_jax.errors import HmemError

BUCKET = "hmem-test"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def s3_server():
    """A moto S3 server on a free loopback port with bucket BUCKET; the AWS_* variables point at
    it for the module (child processes inherit them). Stopped at the end."""
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("moto")
    import portpicker

    port = portpicker.pick_unused_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        deadline = time.time() + 30
        while True:
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except Exception:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)
        yield endpoint, client
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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


def test_unsupported_object_store_paths_are_refused_in_one_line(small_prepared_tree_data):
    from hmem_jax.train.layout import check_paths

    prepared, _, params = small_prepared_tree_data
    cfg = memory_config(params)
    with pytest.raises(HmemError, match="orbax-checkpoint cannot write checkpoints to s3://"):
        check_paths(cfg, f"s3://{BUCKET}/run")
    with pytest.raises(HmemError, match="not supported yet"):
        check_paths(cfg, "gs://bucket/run")
    remote_data = memory_config(params + (f"DataConfig.prepared_dir = 's3://{BUCKET}/data'",))
    with pytest.raises(HmemError, match="grain reads from local files only"):
        check_paths(remote_data, "/tmp/run")
    remote_anchor = memory_config(
        params, init_from=f"s3://{BUCKET}/anchor", memory={"mode": "cotrain"}
    )
    with pytest.raises(HmemError, match="cannot read checkpoints from s3://"):
        check_paths(remote_anchor, "/tmp/run")


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
    with open(os.path.join(workdir, "metrics.jsonl")) as handle:
        for line in handle:
            row = json.loads(line)
            out[row["step"]] = row["train/loss"]
    return out


@pytest.mark.slow
@pytest.mark.ci
def test_a_bank_and_tree_on_s3_survive_kill_9_and_match_a_local_run(
    tmp_path, s3_server, small_prepared_tree_data
):
    """The CLI trains with MemoryConfig.bank_store and TrainConfig.tree_dir on S3, is killed
    (SIGKILL) mid write-back after the step-3 checkpoint, resumes to the end with the losses and
    bank of an uninterrupted run with a local bank; evaluate and export read the S3 bank."""
    prepared, tree, params = small_prepared_tree_data
    paths.upload_tree(tree, f"s3://{BUCKET}/tree")
    memory = {"bank_tier": "streaming", "prefetch_steps": 1}
    reference_cfg = memory_config(params, memory=memory)
    store = f"s3://{BUCKET}/bank"
    cli_params = tuple(p for p in params if not p.startswith("TrainConfig.tree_dir")) + (
        *MEMORY_BINDINGS,
        f"TrainConfig.tree_dir = 's3://{BUCKET}/tree'",
        "MemoryConfig.bank_tier = 'streaming'",
        "MemoryConfig.prefetch_steps = 1",
        f"MemoryConfig.bank_store = '{store}'",
    )
    local_params = tuple(p for p in cli_params if not p.startswith("MemoryConfig.bank_store"))
    local_params = tuple(
        f"TrainConfig.tree_dir = '{tree}'" if p.startswith("TrainConfig.tree_dir") else p
        for p in local_params
    )
    reference = run_entry_point(
        "hmem_jax.main.train", tmp_path / "local", local_params, 1, "--probe_limit=0"
    )
    assert reference.returncode == 0, reference.stdout + reference.stderr
    workdir = tmp_path / "run"
    flags = [f"--workdir={workdir}", "--probe_limit=0"] + [f"--gin_param={p}" for p in cli_params]
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
    assert max(int(s) for s in os.listdir(workdir / "checkpoints")) == 3

    resumed = run_entry_point("hmem_jax.main.train", workdir, cli_params, 1, "--probe_limit=0")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    losses = _losses(workdir)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses == _losses(tmp_path / "local")
    local = streamed_bank(reference_cfg, paths.kvstore_spec(str(tmp_path / "local" / "bank")))
    remote = streamed_bank(reference_cfg, paths.kvstore_spec(store))
    for key, fields in local.items():
        for field, value in fields.items():
            np.testing.assert_array_equal(remote[key][field], value, err_msg=f"{key} {field}")

    evaluated = run_entry_point(
        "hmem_jax.main.evaluate", workdir, (), 1, "--limit=5", f"--out={tmp_path / 'eval'}"
    )
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["probe"]
    pytest.importorskip("safetensors", reason="export needs the 'hf' extra")
    exported = run_entry_point(
        "hmem_jax.main.export",
        workdir,
        (),
        1,
        f"--out={tmp_path / 'hf'}",
        "--memory=fetched",
        "--path=1,2",
    )
    assert exported.returncode == 0, exported.stdout + exported.stderr
    record = json.loads((tmp_path / "hf" / "hmem_export.json").read_text())
    assert record["block_ids"] == [1, 6]  # the blocks of path 1,2, read from the S3 bank
