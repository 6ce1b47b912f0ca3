"""The synthetic long-tail encyclopedia: deterministic, honest mention counts, a long tail."""

import collections
import re

import numpy as np
import pytest

from hmem_jax.data import encyclopedia

NUM_ENTITIES = 300


@pytest.fixture(scope="module")
def corpus():
    return encyclopedia.generate_corpus(NUM_ENTITIES, seed=7)


def test_same_seed_gives_identical_corpus(corpus):
    again = encyclopedia.generate_corpus(NUM_ENTITIES, seed=7)
    assert again.documents == corpus.documents
    assert again.probes == corpus.probes


def test_different_seed_gives_different_corpus(corpus):
    other = encyclopedia.generate_corpus(NUM_ENTITIES, seed=8)
    assert [d.text for d in other.documents[:20]] != [d.text for d in corpus.documents[:20]]


def test_recorded_mentions_equal_name_occurrences_in_text(corpus):
    text = "\n".join(d.text for d in corpus.documents)
    for entity in corpus.entities[:60]:
        found = len(re.findall(rf"(?<![\w-]){re.escape(entity.name)}(?![\w-])", text))
        assert found == entity.mentions, entity.name


def test_mentions_have_a_long_tail(corpus):
    mentions = np.sort([e.mentions for e in corpus.entities])[::-1]
    top_decile_share = mentions[: NUM_ENTITIES // 10].sum() / mentions.sum()
    assert top_decile_share > 0.25  # uniform would be 0.1 (the floor of passages flattens it)
    assert mentions[0] > 10 * np.median(mentions)


def test_every_probed_fact_is_stated_in_several_documents_that_the_probe_names(corpus):
    texts = {d.id: d.text for d in corpus.documents}
    for probe in corpus.probes:
        assert len(probe.documents) >= 3, probe  # the article and two short passages at least
        for doc in probe.documents:
            assert probe.answer in texts[doc] and probe.entity in texts[doc]


def test_buckets_are_quintiles_rising_with_frequency(corpus):
    sizes = collections.Counter(p.bucket for p in corpus.probes)
    assert sorted(sizes) == list(range(encyclopedia.NUM_BUCKETS))
    assert max(sizes.values()) - min(sizes.values()) <= 1
    means = [np.mean([p.mentions for p in corpus.probes if p.bucket == b]) for b in range(5)]
    assert means == sorted(means) and means[-1] > 3 * means[0]


def test_every_probe_is_answered_verbatim_somewhere(corpus):
    texts = [d.text for d in corpus.documents]
    for probe in corpus.probes:
        stated = f"{probe.prompt} {probe.answer}."
        assert any(stated in t for t in texts) or any(
            probe.entity in t and probe.answer in t for t in texts
        ), probe


def test_probes_cover_every_entity_with_integer_answers(corpus):
    assert len(corpus.probes) == NUM_ENTITIES
    assert len({p.entity for p in corpus.probes}) == NUM_ENTITIES
    assert all(p.answer.isdigit() for p in corpus.probes)


def test_default_size_fits_the_cpu_budget():
    corpus = encyclopedia.generate_corpus(3000, seed=0)
    assert 2e6 <= corpus.num_characters() <= 6e6


def test_probes_round_trip_through_jsonl(corpus, tmp_path):
    path = tmp_path / "probes.jsonl"
    assert encyclopedia.write_probes(corpus.probes, str(path)) == NUM_ENTITIES
    assert encyclopedia.read_probes(str(path)) == corpus.probes
