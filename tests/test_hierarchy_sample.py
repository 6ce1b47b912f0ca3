"""Fitting a tree on a streamed sample (HierarchyConfig.fit_sample): the reservoir is uniform,
deterministic and bounded, and the fit sees only the sample."""

import gc
import json
import weakref

import numpy as np
import pytest

from hmem_jax.config import DataConfig, HierarchyConfig
from hmem_jax.data.document import Document
from hmem_jax.hierarchy import ClusterTree
from hmem_jax.hierarchy import embedders as embedders_lib
from hmem_jax.hierarchy.corpus import cluster_corpus, reservoir_sample


def _documents(count):
    return (Document(id=str(i), text=f"text {i}") for i in range(count))


def test_the_reservoir_is_deterministic_in_corpus_order_and_whole_when_small():
    sample, seen = reservoir_sample(_documents(1000), 50, seed=3)
    again, _ = reservoir_sample(_documents(1000), 50, seed=3)
    other, _ = reservoir_sample(_documents(1000), 50, seed=4)
    ids = [int(d.id) for d in sample]
    assert seen == 1000 and len(ids) == 50 and ids == sorted(ids)
    assert sample == again and sample != other
    everything, seen = reservoir_sample(_documents(30), 50, seed=3)
    assert seen == 30 and [d.id for d in everything] == [str(i) for i in range(30)]


def test_the_reservoir_draws_every_document_with_the_same_chance():
    """Over 300 seeds, each of 400 documents is in a 40-sample ~30 times (10%): the first,
    middle and last tenths of the corpus are drawn alike (each ~1,200 of 12,000 draws) and
    no document is far off its expectation."""
    size, count, seeds = 40, 400, 300
    hits = np.zeros(count)
    for seed in range(seeds):
        sample, _ = reservoir_sample(_documents(count), size, seed=seed, block=64)
        hits[[int(d.id) for d in sample]] += 1
    expected = seeds * size / count  # 30
    tenths = hits.reshape(10, -1).sum(axis=1)
    assert np.all(np.abs(tenths - expected * count / 10) < 0.12 * expected * count / 10)
    assert hits.min() > expected / 3 and hits.max() < expected * 2


def test_the_reservoir_holds_no_more_than_its_size_while_the_corpus_streams():
    alive = weakref.WeakSet()
    most = 0

    def stream():
        nonlocal most
        for i in range(20_000):
            document = Document(id=str(i), text="x")
            alive.add(document)
            if i % 1000 == 0:
                gc.collect()
                most = max(most, len(alive))
            yield document

    sample, seen = reservoir_sample(stream(), 100, seed=0)
    assert seen == 20_000 and len(sample) == 100
    assert most <= 102  # the sample, plus the document in hand


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    topics = ["volcano lava magma", "violin symphony concert", "galaxy star orbit", "wheat farm"]
    with open(path, "w") as handle:
        for i in range(600):
            text = f"Entry {i} is about {topics[i % 4]}; item {i} number {i * 13}."
            handle.write(json.dumps({"id": f"doc-{i}", "text": text}) + "\n")
    return DataConfig(source="jsonl", path=str(path))


def _hierarchy(**changes):
    return HierarchyConfig(branching=4, depth=2, samples_per_step=64, em_steps=4, **changes)


def test_a_sample_as_big_as_the_corpus_fits_the_tree_of_the_whole_corpus(corpus, tmp_path):
    cluster_corpus(corpus, _hierarchy(), tmp_path / "all", verbose=False)
    cluster_corpus(corpus, _hierarchy(fit_sample=600), tmp_path / "sampled", verbose=False)
    whole, sampled = (ClusterTree.load(tmp_path / name) for name in ("all", "sampled"))
    assert whole.content_hash == sampled.content_hash


def test_a_smaller_sample_is_all_the_fit_embeds(corpus, tmp_path, monkeypatch):
    """Only the 150 sampled documents are embedded (document frequencies and vectors); the
    report and the tree record the 600 read and the 150 fitted."""
    embedded = []
    original = embedders_lib.HashedNgramEmbedder.embed

    def counting(self, texts):
        embedded.append(len(texts))
        return original(self, texts)

    monkeypatch.setattr(embedders_lib.HashedNgramEmbedder, "embed", counting)
    out = tmp_path / "sampled"
    report = cluster_corpus(corpus, _hierarchy(fit_sample=150), out, verbose=False)
    assert sum(embedded) == 150
    assert report["documents_read"] == 600 and len(np.load(out / "paths.npy")) == 150
    ids = json.loads((out / "doc_ids.json").read_text())
    assert len(ids) == 150 and ids == sorted(ids, key=lambda i: int(i.split("-")[1]))
    info = ClusterTree.load(out).fit_info
    assert (info["documents_read"], info["documents_fitted"]) == (600, 150)


def test_a_sample_smaller_than_the_branching_is_refused():
    with pytest.raises(ValueError, match="fit_sample = 3 must be None"):
        HierarchyConfig(branching=4, fit_sample=3)
