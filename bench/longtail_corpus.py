"""A second long-tail corpus, unlike the embedded encyclopedia: invented islands and their peaks.

    python bench/longtail_corpus.py --out=/tmp/islands [--islands=300] [--seed=0]

Writes OUT/corpus.jsonl (`id`, `text`) and OUT/probes.jsonl (`prompt`, `answer`, `bucket`,
`documents`) for the public CLI:

    python -m hmem_jax.main.recipe --workdir=/tmp/islands/run --gin_file=experiments/default.gin \\
        --gin_param="DataConfig.source = 'jsonl'" \\
        --gin_param="DataConfig.path = '/tmp/islands/corpus.jsonl'"
    python -m hmem_jax.main.evaluate --workdir=/tmp/islands/run/memory \\
        --baseline=/tmp/islands/run/baseline --probe_file=/tmp/islands/probes.jsonl

Each island has a highest peak (metres, the probed fact), an area, a number of inhabitants, a
sea and a chief harbour; island i of Zipf rank r is described by one survey page, three short
passages and about A / r^0.9 travel notes. Other vocabulary, other templates and other names
than the encyclopedia: a check that the long-tail effect is not a property of one generator.
Buckets are quintiles of how often the island is named (0 = rarest).
"""

from __future__ import annotations

import argparse
import json
import os
import random

SEAS = ("Amber Sea", "Glass Sea", "Northern Reach", "Salt Gulf", "Violet Strait", "Long Bight")
SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ha", "pe", "qu", "zo", "ul", "en")
WEATHER = (
    "Fog rolled in before noon.",
    "The ferry left an hour late.",
    "Gulls followed the boat all morning.",
    "The wind turned cold at dusk.",
    "Fishermen mended their nets on the quay.",
    "It rained on the second day.",
)


def _name(rng: random.Random, used: set[str]) -> str:
    while True:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).title() + " Isle"
        if name not in used:
            used.add(name)
            return name


def write_corpus(out: str, islands: int, seed: int) -> tuple[int, int]:
    rng = random.Random(seed)
    used: set[str] = set()
    world = [
        {
            "name": _name(rng, used),
            "peak": rng.randint(40, 4800),
            "area": rng.randint(2, 900),
            "people": rng.randint(10, 90_000),
            "sea": rng.choice(SEAS),
            "harbour": _name(rng, used).replace(" Isle", " Harbour"),
        }
        for _ in range(islands)
    ]
    ranks = list(range(1, islands + 1))
    rng.shuffle(ranks)
    docs: list[dict] = []
    stated: dict[int, list[str]] = {i: [] for i in range(islands)}
    mentions = [0] * islands

    def peak(i: int) -> str:
        w = world[i]
        return rng.choice(
            (
                f"The highest point of {w['name']} rises to {w['peak']} metres.",
                f"The summit of {w['name']} stands {w['peak']} metres above the sea.",
                f"{w['name']} reaches {w['peak']} metres at its highest peak.",
            )
        )

    def other(i: int) -> str:
        w = world[i]
        return rng.choice(
            (
                f"{w['name']} covers {w['area']} square kilometres.",
                f"About {w['people']} people live on {w['name']}.",
                f"{w['name']} lies in the {w['sea']}.",
                f"Boats for {w['name']} dock at {w['harbour']}.",
            )
        )

    def add(i: int, sentences: list[str], states_peak: bool) -> None:
        doc_id = f"island-{len(docs):06d}"
        text = " ".join(sentences)
        docs.append({"id": doc_id, "text": text})
        mentions[i] += text.count(world[i]["name"])
        if states_peak:
            stated[i].append(doc_id)

    for i, w in enumerate(world):
        add(i, [f"Survey of {w['name']}.", peak(i), other(i), other(i), other(i)], True)
        add(i, [rng.choice(WEATHER), peak(i)], True)
        add(i, [other(i), rng.choice(WEATHER)], False)
        add(i, [rng.choice(WEATHER), peak(i), rng.choice(WEATHER)], True)
        extra = 0.25 * islands / ranks[i] ** 0.9
        for _ in range(int(extra) + (rng.random() < extra % 1)):
            with_peak = rng.random() < 0.5
            body = [peak(i)] if with_peak else [other(i)]
            add(
                i,
                [f"Travel notes, {rng.randint(1950, 2020)}.", rng.choice(WEATHER)]
                + body
                + [other(i)],
                with_peak,
            )
    rng.shuffle(docs)
    order = sorted(range(islands), key=lambda i: (mentions[i], -ranks[i]))
    bucket = {i: position * 5 // islands for position, i in enumerate(order)}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "corpus.jsonl"), "w") as handle:
        handle.writelines(json.dumps(d) + "\n" for d in docs)
    with open(os.path.join(out, "probes.jsonl"), "w") as handle:
        for i, w in enumerate(world):
            handle.write(
                json.dumps(
                    {
                        "prompt": f"The highest point of {w['name']} rises to",
                        "answer": w["peak"],
                        "bucket": bucket[i],
                        "documents": stated[i],
                    }
                )
                + "\n"
            )
    return len(docs), islands


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--islands", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    documents, count = write_corpus(args.out, args.islands, args.seed)
    print(f"wrote {documents} documents about {count} islands and {count} probes to {args.out}")
