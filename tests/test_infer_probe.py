"""Probe files: every answer kind, matching rules, errors that name the line."""

import json

import pytest

from hmem_jax.infer.probe import ProbeFileError, ProbeItem, format_probe_table, read_probe_file


def _write(path, rows):
    path.write_text(
        "\n".join(json.dumps(row) if isinstance(row, dict) else row for row in rows) + "\n"
    )
    return str(path)


def test_probe_file_reads_integer_prefix_and_list_answers(tmp_path):
    path = _write(
        tmp_path / "probes.jsonl",
        [
            {
                "prompt": "The atomic number of Xenon is",
                "answer": 54,
                "bucket": 2,
                "documents": ["d1", "d7"],
            },
            {"prompt": "The capital of France is", "answer": "Paris"},
            {
                "prompt": "Who wrote Hamlet?",
                "answer": ["Shakespeare", "William Shakespeare"],
                "bucket": 4,
            },
            {"prompt": "Year of the fall:", "answer": "1453", "match": "prefix"},
        ],
    )
    items = read_probe_file(path)
    assert items[0] == ProbeItem(
        "The atomic number of Xenon is", ("54",), 2, "integer", ("d1", "d7")
    )
    assert items[1].match == "prefix" and items[1].bucket == 0
    assert items[2].answers == ("Shakespeare", "William Shakespeare")
    assert items[3].match == "prefix"


def test_integer_answers_match_the_first_integer_generated():
    item = ProbeItem("p", ("54",))
    assert item.is_correct(" 54, a noble gas")
    assert item.is_correct("element number 54")
    assert not item.is_correct(" 5 or 54")  # only the first integer counts
    assert not item.is_correct(" 540")
    assert not item.is_correct(" fifty-four")


def test_prefix_answers_match_the_start_of_the_stripped_continuation():
    item = ProbeItem("p", ("Paris", "Paris, France"), match="prefix")
    assert item.is_correct(" Paris is large")
    assert not item.is_correct(" paris")  # exact, case-sensitive
    assert not item.is_correct(" It is Paris")
    listed = ProbeItem("p", ("Shakespeare", "William Shakespeare"), match="prefix")
    assert listed.is_correct(" William Shakespeare.") and listed.is_correct("Shakespeare")


@pytest.mark.parametrize(
    "row, message",
    [
        ('{"prompt": "x"}', "'prompt' and 'answer'"),
        ("not json", "not JSON"),
        ('{"prompt": "x", "answer": 3, "bucket": -1}', "'bucket'"),
        ('{"prompt": "x", "answer": 3, "match": "regex"}', "'match'"),
        ('{"prompt": "x", "answer": []}', "'answer'"),
    ],
)
def test_bad_probe_rows_are_reported_with_file_and_line(tmp_path, row, message):
    path = _write(tmp_path / "bad.jsonl", ['{"prompt": "ok", "answer": 1}', row])
    with pytest.raises(ProbeFileError, match=message) as error:
        read_probe_file(path)
    assert f"{path}:2" in str(error.value)


def test_a_missing_or_empty_probe_file_is_a_clear_error(tmp_path):
    with pytest.raises(ProbeFileError, match="does not exist"):
        read_probe_file(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ProbeFileError, match="no probes"):
        read_probe_file(str(tmp_path / "empty.jsonl"))


def test_probe_table_lines_up_runs_of_any_name_length():
    row = {"per_bucket": [0.5, None], "overall": 0.5, "n_per_bucket": [2, 0]}
    table = format_probe_table({"baseline, anchor only": row, "memory: fetched": row}, label="run")
    lines = table.splitlines()
    assert lines[0].startswith("run") and lines[1].startswith("baseline, anchor only")
    assert len({len(line) for line in lines}) == 1 and "50.0" in lines[2] and "-" in lines[2]
