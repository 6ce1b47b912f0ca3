"""Tokenizers: trained locally, exact round trips, explicit special ids, checked on reload."""

import json
import pickle

import pytest

from hmem_jax.data import encyclopedia
from hmem_jax.data import tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def texts():
    return [d.text for d in encyclopedia.generate_corpus(150, seed=1).documents]


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(texts):
    return tokenizer_lib.train_sentencepiece(texts, vocab_size=600)


def test_sentencepiece_round_trips_text_exactly(sentencepiece_tokenizer, texts):
    for text in texts[:50] + ["  two  spaces\nnew line", "unseen: caf\u00e9 \u2603 \U0001f600"]:
        assert sentencepiece_tokenizer.decode(sentencepiece_tokenizer.encode(text)) == text


def test_sentencepiece_special_ids_are_distinct_and_in_vocab(sentencepiece_tokenizer):
    tok = sentencepiece_tokenizer
    assert (tok.pad_id, tok.bos_id, tok.eot_id) == (0, 2, 3)
    assert tok.vocab_size <= 600
    assert tok.eot_id not in tok.encode("The atomic number of Xium is 12.")


def test_digits_are_split_one_per_token(sentencepiece_tokenizer):
    pieces = [
        sentencepiece_tokenizer.decode([i]) for i in sentencepiece_tokenizer.encode("is 1071")
    ]
    assert pieces[-4:] == ["1", "0", "7", "1"]


def test_encode_batch_equals_encode(sentencepiece_tokenizer, texts):
    assert sentencepiece_tokenizer.encode_batch(texts[:5]) == [
        sentencepiece_tokenizer.encode(t) for t in texts[:5]
    ]


def test_tokenizer_survives_pickling_for_worker_processes(sentencepiece_tokenizer):
    clone = pickle.loads(pickle.dumps(sentencepiece_tokenizer))
    assert clone.encode("hello world") == sentencepiece_tokenizer.encode("hello world")
    assert clone.sha256 == sentencepiece_tokenizer.sha256


def test_hf_tokenizer_trains_loads_and_round_trips(texts, tmp_path):
    pytest.importorskip("tokenizers", reason="the optional `tokenizers` package is not installed")
    trained = tokenizer_lib.train_hf_bpe(texts, vocab_size=600)
    path = tmp_path / "tokenizer.json"
    path.write_bytes(trained.data)
    loaded = tokenizer_lib.build_tokenizer("hf", str(path), [], vocab_size=600)
    assert loaded.vocab_size == trained.vocab_size <= 600
    assert (loaded.pad_id, loaded.eot_id) == (0, 1)
    for text in texts[:20] + ["caf\u00e9 \u2603"]:
        assert loaded.decode(loaded.encode(text)) == text


def test_missing_tokenizer_file_is_a_clear_error(tmp_path):
    with pytest.raises(tokenizer_lib.TokenizerError, match="does not exist"):
        tokenizer_lib.build_tokenizer("sentencepiece", str(tmp_path / "nope.model"), [], 600)


def test_load_tokenizer_rejects_a_swapped_file(sentencepiece_tokenizer, texts, tmp_path):
    sentencepiece_tokenizer.save(str(tmp_path))
    (tmp_path / "manifest.json").write_text(
        json.dumps({"tokenizer": sentencepiece_tokenizer.describe()})
    )
    assert tokenizer_lib.load_tokenizer(str(tmp_path)).sha256 == sentencepiece_tokenizer.sha256
    tokenizer_lib.train_sentencepiece(texts[:40], vocab_size=400).save(str(tmp_path))
    with pytest.raises(tokenizer_lib.TokenizerError, match="does not match"):
        tokenizer_lib.load_tokenizer(str(tmp_path))
