"""The atomic-number probe: element names counted by prepare, bucketed by the corpus's counts."""

import json

from hmem_jax.config import DataConfig
from hmem_jax.data import elements
from hmem_jax.data import prepare as prepare_lib
from hmem_jax.infer.probe import element_probes


def test_names_and_aliases_are_counted_as_whole_words_case_insensitively():
    counter = elements.ElementCounter()
    counter.add(
        [
            "Xenon and xenon glow; XENON lamps.",
            "Aluminum, aluminium and Aluminiumoxide",
            "Sulphur smells like sulfur.",
            "Neonatal care is not neon.",
        ]
    )
    assert counter.counts["Xenon"] == 3
    assert counter.counts["Aluminium"] == 2  # 'Aluminiumoxide' is another word
    assert counter.counts["Sulfur"] == 2
    assert counter.counts["Neon"] == 1
    assert sum(counter.counts.values()) == 8
    assert len(elements.ELEMENTS) == 118
    assert [number for number, _, _ in elements.ELEMENTS] == list(range(1, 119))


def test_prepare_stores_the_counts_and_the_probe_buckets_by_them(tmp_path):
    texts = (
        ["Iron is common. Iron rusts."] * 40
        + ["Gold is rare but gold shines."] * 3
        + ["Xenon is a noble gas."]
        + ["Rivers run to the sea."] * 20
    )
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n")
    data = DataConfig(source="jsonl", path=str(path), vocab_size=300, prepare_workers=0)
    out = str(tmp_path / "prepared")
    prepare_lib.prepare(data, 32, out, progress=False)
    counts = elements.read_counts(out)
    assert counts["Iron"] == 80 and counts["Gold"] == 6 and counts["Xenon"] == 1
    probes = {p.prompt: p for p in element_probes(out)}
    assert len(probes) == 118
    iron = probes["The atomic number of Iron is"]
    assert iron.answers == ("26",) and iron.bucket == 4 and iron.match == "integer"
    assert probes["The atomic number of Gold is"].bucket == 4
    assert probes["The atomic number of Hydrogen is"].bucket == 0  # never named: rarest
    sizes = [sum(p.bucket == b for p in probes.values()) for b in range(5)]
    assert sizes == [24, 24, 23, 24, 23]
