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


def test_a_model_folders_tokenizer_json_tokenizes_the_corpus_into_a_padded_vocabulary(
    texts, tmp_path
):
    """DataConfig.tokenizer_path = a Hugging Face model folder (as for the paper's GPT-NeoX
    tokenizer, padded to a multiple of 64): its tokenizer.json is used as given, byte for
    byte, the loader's tokens decode to the corpus, and the padded size is the model's."""
    pytest.importorskip("tokenizers", reason="the optional `tokenizers` package is not installed")
    import numpy as np

    from hmem_jax.config import ConfigError
    from hmem_jax.data.loader import Loader
    from hmem_jax.data.prepare import ensure_prepared
    from hmem_jax.errors import PreparedDataError, TokenizerError
    from hmem_jax.main.common import load_train_config

    folder = tmp_path / "model"
    folder.mkdir()
    trained = tokenizer_lib.train_hf_bpe(texts, vocab_size=600)
    (folder / "tokenizer.json").write_bytes(trained.data)
    padded = -(-trained.vocab_size // 64) * 64
    params = (
        "DataConfig.embedded_entities = 150",
        "DataConfig.tokenizer = 'hf'",
        f"DataConfig.tokenizer_path = '{folder}'",
        f"DataConfig.vocab_size = {padded}",
        "TrainConfig.model = @model_preset()",
        "model_preset.name = 'tiny'",
        f"model_preset.vocab_size = {padded}",
        "TrainConfig.seq_len = 64",
    )
    cfg = load_train_config((), params)
    out = str(tmp_path / "data")
    ensure_prepared(cfg, out, progress=False)
    used = tokenizer_lib.load_tokenizer(out)
    assert used.data == trained.data and used.vocab_size == trained.vocab_size < padded
    assert cfg.model.vocab_size == padded
    loader = Loader(out, 4, 64, 0)
    tokens = np.asarray(loader.batch(0)["tokens"])
    assert 0 <= tokens.min() and tokens.max() < trained.vocab_size
    segments = np.asarray(loader.batch(0)["segment_ids"])[0]
    piece = used.decode([t for t in tokens[0][segments == segments[0]] if t != used.eot_id])
    corpus = [d.text for d in encyclopedia.generate_corpus(150, seed=0).documents]
    assert len(piece) > 20 and any(piece in text for text in corpus), piece

    too_small = params[:3] + (f"DataConfig.vocab_size = {trained.vocab_size - 1}",) + params[4:]
    with pytest.raises(PreparedDataError, match="Raise DataConfig.vocab_size"):
        ensure_prepared(load_train_config((), too_small), str(tmp_path / "d2"), progress=False)
    with pytest.raises(ConfigError, match="raise the model's"):
        load_train_config((), params + (f"model_preset.vocab_size = {padded - 64}",))
    with pytest.raises(TokenizerError, match="set DataConfig.tokenizer = 'hf'"):
        tokenizer_lib.build_tokenizer("sentencepiece", str(folder), [], padded)
    with pytest.raises(TokenizerError, match="set DataConfig.tokenizer = 'hf'"):
        tokenizer_lib.build_tokenizer("sentencepiece", str(folder / "tokenizer.json"), [], 1)
