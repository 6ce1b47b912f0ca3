"""Document sources: jsonl, text folders, embedded, seqio; bad input is repaired and counted."""

import gzip
import json

import pytest
import zstandard

from hmem_jax.config import DataConfig
from hmem_jax.data import encyclopedia
from hmem_jax.data.sources import SourceError, SourceStats, read_documents, split_text


def _read(config):
    stats = SourceStats()
    return list(read_documents(config, stats)), stats


def test_jsonl_reads_text_and_ids_with_line_number_fallback(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(
        json.dumps({"text": "alpha", "id": "a"}) + "\n" + json.dumps({"text": "beta"}) + "\n"
    )
    documents, stats = _read(DataConfig(source="jsonl", path=str(path)))
    assert [(d.id, d.text) for d in documents] == [("a", "alpha"), ("docs:2", "beta")]
    assert stats.documents == 2 and not stats.problems()


def test_jsonl_skips_empty_and_malformed_and_repairs_non_utf8(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(
        b'{"text": "   "}\nnot json\n{"id": 3}\n{"text": "caf\xe9 ok"}\n'
        b'{"text": "lone \\ud800 surrogate"}\n'
    )
    documents, stats = _read(DataConfig(source="jsonl", path=str(path)))
    assert [d.text for d in documents] == ["caf\ufffd ok", "lone \ufffd surrogate"]
    assert (stats.empty_skipped, stats.malformed_skipped, stats.non_utf8_replaced) == (1, 2, 2)
    for document in documents:
        document.text.encode("utf-8")  # never raises: everything downstream can encode it


def test_huge_jsonl_document_is_split_losslessly(tmp_path):
    text = " ".join(f"word{i}" for i in range(3000))
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"text": text, "id": "big"}) + "\n")
    documents, stats = _read(DataConfig(source="jsonl", path=str(path), max_document_chars=1000))
    assert stats.huge_split == 1 and len(documents) > 10
    assert all(len(d.text) <= 1000 for d in documents)
    assert "".join(d.text for d in documents) == text
    assert documents[0].id == "big#1"


def test_text_dir_is_recursive_sorted_and_streams_huge_files(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.txt").write_bytes(b"second \xff file")
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "notes.md").write_text("ignored")
    huge = "line of text\n" * 2000  # 26,000 chars, streamed in pieces of <= 500
    (tmp_path / "c_huge.txt").write_text(huge)
    documents, stats = _read(
        DataConfig(source="text_dir", path=str(tmp_path), max_document_chars=500)
    )
    ids = [d.id for d in documents]
    assert ids[:1] == ["a.txt"] and ids[-1] == "c_huge.txt#" + str(len(ids) - 2)
    assert [d.text for d in documents if d.id == "b/two.txt"] == ["second \ufffd file"]
    assert "".join(d.text for d in documents if d.id.startswith("c_huge")) == huge
    assert (stats.empty_skipped, stats.non_utf8_replaced, stats.huge_split) == (1, 1, 1)
    assert stats.documents == len(documents)


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        list(read_documents(DataConfig(source="jsonl", path=str(tmp_path / "nope.jsonl"))))
    with pytest.raises(SourceError, match="no .txt / .txt.gz / .txt.zst files"):
        list(read_documents(DataConfig(source="text_dir", path=str(tmp_path))))
    with pytest.raises(SourceError, match="matches no files"):
        list(read_documents(DataConfig(source="jsonl", path=str(tmp_path / "*.jsonl"))))


def _compress(data: bytes, suffix: str) -> bytes:
    if suffix == ".gz":
        return gzip.compress(data)
    if suffix == ".zst":
        return zstandard.ZstdCompressor().compress(data)
    return data


@pytest.mark.parametrize("suffix", ["", ".gz", ".zst"])
def test_compressed_files_read_like_plain_ones(tmp_path, suffix):
    """.jsonl.gz / .jsonl.zst shards (as DCLM ships) and compressed text files, the huge one
    streamed in pieces, give the documents and counts the plain files give."""
    lines = [json.dumps({"text": f"document {i} " * 30}) for i in range(200)] + ["not json"]
    jsonl = ("\n".join(lines) + "\n").encode()
    huge = ("word " * 2_000).encode()  # > 4 x max_document_chars: streamed
    for folder in ("plain", "packed"):
        (tmp_path / folder / "t").mkdir(parents=True)
    (tmp_path / "plain" / "shard.jsonl").write_bytes(jsonl)
    (tmp_path / "packed" / f"shard.jsonl{suffix}").write_bytes(_compress(jsonl, suffix))
    (tmp_path / "plain" / "t" / "huge.txt").write_bytes(huge)
    (tmp_path / "packed" / "t" / f"huge.txt{suffix}").write_bytes(_compress(huge, suffix))

    def read(folder, source, max_chars=400):
        config = DataConfig(
            source=source, path=str(tmp_path / folder), max_document_chars=max_chars
        )
        documents, stats = _read(config)
        return [(d.id.replace(suffix, "") if suffix else d.id, d.text) for d in documents], stats

    plain, plain_stats = read("plain", "jsonl")
    packed, packed_stats = read("packed", "jsonl")
    assert packed == plain and len(plain) == 200 and packed_stats == plain_stats
    assert packed_stats.malformed_skipped == 1
    plain, plain_stats = read("plain/t", "text_dir")
    packed, packed_stats = read("packed/t", "text_dir")
    assert packed == plain and len(plain) > 20 and packed_stats == plain_stats
    assert packed_stats.huge_split == 1


def test_a_pattern_selects_files_in_sorted_order_and_ids_are_relative_to_its_folder(tmp_path):
    for name in ("b/2.txt", "a/1.txt", "a/skip.md", "c/3.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"text of {name}")
    documents, _ = _read(DataConfig(source="text_dir", path=str(tmp_path / "[ab]" / "*.txt")))
    assert [d.id for d in documents] == ["a/1.txt", "b/2.txt"]
    documents, _ = _read(DataConfig(source="text_dir", path=str(tmp_path / "**" / "*.txt")))
    assert [d.text for d in documents] == ["text of a/1.txt", "text of b/2.txt", "text of c/3.txt"]


def test_split_text_prefers_whitespace_and_keeps_every_character():
    text = "aaaa bbbb cccc " * 20 + "x" * 95
    pieces = split_text(text, 40)
    assert "".join(pieces) == text
    assert all(len(p) <= 40 for p in pieces)
    assert all(p.endswith(" ") for p in pieces[:5])


def test_embedded_source_is_the_encyclopedia():
    documents, stats = _read(DataConfig(embedded_entities=50, embedded_seed=3))
    assert documents == encyclopedia.generate_corpus(50, 3).documents
    assert stats.documents == len(documents)


@pytest.mark.extras  # tests/run_extras.sh
def test_seqio_task_text_feature_becomes_documents():
    seqio = pytest.importorskip("seqio", reason="the optional `seqio` extra is not installed")
    import tensorflow as tf

    lines = ["first seqio document", "", "second one"]
    name = "hmem_test_local_text_task"
    if name not in seqio.TaskRegistry.names():
        seqio.TaskRegistry.add(
            name,
            source=seqio.FunctionDataSource(
                lambda split, shuffle_files, seed=None: tf.data.Dataset.from_tensor_slices(
                    {"text": lines}
                ),
                splits=["train"],
            ),
            preprocessors=[],
            output_features={},
        )
    documents, stats = _read(DataConfig(source="seqio", path=name))
    assert [d.text for d in documents] == ["first seqio document", "second one"]
    assert stats.empty_skipped == 1
