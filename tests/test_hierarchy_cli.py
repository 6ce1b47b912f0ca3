"""`python -m hmem_jax.main.cluster` end to end, in a subprocess, on a small jsonl corpus."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hmem_jax.hierarchy import ClusterTree

TOPICS = [
    "volcano lava eruption magma",
    "violin orchestra symphony concert",
    "galaxy telescope star orbit",
    "wheat harvest farm soil",
]


def write_corpus(path, count=160):
    with open(path, "w") as handle:
        for i in range(count):
            topic = TOPICS[i % len(TOPICS)]
            text = f"Entry {i} is about {topic}; item {i} number {i * 13}."
            handle.write(json.dumps({"id": f"doc-{i}", "text": text}) + "\n")


def run_cluster(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "hmem_jax.main.cluster", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    corpus = folder / "corpus.jsonl"
    write_corpus(corpus)
    out = folder / "out"
    result = run_cluster(
        f"--docs={corpus}",
        f"--out={out}",
        f"--cache_dir={folder / 'cache'}",
        "--gin_param=HierarchyConfig.branching = 4",
        "--gin_param=HierarchyConfig.depth = 2",
        "--gin_param=HierarchyConfig.samples_per_step = 100",
    )
    assert result.returncode == 0, result.stderr
    return folder, out, result


def test_cli_writes_tree_paths_ids_and_report(cluster_run):
    folder, out, result = cluster_run
    paths = np.load(out / "paths.npy")
    ids = json.loads((out / "doc_ids.json").read_text())
    assert paths.shape == (160, 2) and paths.dtype == np.int32
    assert ids[:2] == ["doc-0", "doc-1"] and len(ids) == 160
    tree = ClusterTree.load(out)
    assert tree.embedder_name == "hashed_idf"  # the default: fitted on this corpus
    assert tree.num_clusters == (4, 16)
    lines = (folder / "corpus.jsonl").read_text().splitlines()
    texts = [json.loads(line)["text"] for line in lines]
    np.testing.assert_array_equal(tree.route_texts(texts, tree.make_embedder()), paths)
    report = json.loads((out / "report.json").read_text())
    assert report["documents"] == 160 and len(report["levels"]) == 2
    assert report["tree_hash"] == tree.content_hash
    assert "level 2" in result.stdout
    assert list((folder / "cache").glob("*.npy")), "embeddings were not cached"


def test_cli_groups_documents_of_one_topic_together(cluster_run):
    _, out, _ = cluster_run
    level1 = np.load(out / "paths.npy")[:, 0]
    topic = np.arange(160) % len(TOPICS)
    for t in range(len(TOPICS)):
        assert np.bincount(level1[topic == t]).max() >= 0.8 * (topic == t).sum()


def test_cli_rejects_a_missing_corpus_with_a_clear_message(tmp_path):
    result = run_cluster(f"--docs={tmp_path / 'missing.jsonl'}", f"--out={tmp_path / 'out'}")
    assert result.returncode != 0
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_cli_rejects_an_empty_corpus_with_a_clear_message(tmp_path):
    corpus = tmp_path / "empty.jsonl"
    corpus.write_text("")
    result = run_cluster(
        f"--docs={corpus}", f"--out={tmp_path / 'out'}", f"--cache_dir={tmp_path / 'cache'}"
    )
    assert result.returncode != 0
    assert "no documents" in result.stderr and "Traceback" not in result.stderr
