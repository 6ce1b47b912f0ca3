"""A synthetic long-tail "encyclopedia": the embedded default data of hmem_jax.

Why synthetic: the paper's central claim (docs/method.md, the atomic-number probe)
is that memories help most on facts about *rare* entities. To see that on a
laptop we need a corpus where (a) every fact is stated somewhere, (b) how often
an entity is mentioned follows a long (Zipf-like) tail, and (c) we know each
entity's exact mention count, so probes can be bucketed by frequency. Real text
cannot give (c) offline; this generator gives all three, deterministically from
a seed, with all text written by this module.

The world: invented chemical elements (atomic number, discovery year, where and
by whom discovered), people (birth year, birthplace, profession, mentor) and
cities (country, founding year, population, river). Entities get a Zipf rank;
an entity of rank r is the subject of one article and four short passages
(each stating one fact, two of them the probed one), and of A / r^0.9 more
documents on average (stochastically rounded; A scales with the number of
entities) in random styles (article, news, question and answer, list), each
fact phrased by one of several paraphrases. The floor of short passages that
name the entity first in the sentence stating a fact is what makes a rare
fact learnable as knowledge at all: a fact seen only inside one fixed
document is memorised with that document but not recalled from a plain
prompt such as the probe's; real corpora state even rare facts a few times,
in different words. Documents also
mention related entities and carry common-knowledge filler (arithmetic,
calendars, everyday sentences) so an anchor model has general structure to
learn. Every insertion of an entity's name is counted; the five frequency
buckets are quintiles of that count (bucket 0 = rarest, 4 = most frequent).

Probes (prompt, answer) mirror the paper's "The atomic number of {element} is":
the answer is always an integer, scored as the first integer generated.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random
from collections.abc import Callable, Iterable

from hmem_jax import paths
from hmem_jax.data.document import Document
from hmem_jax.errors import ConfigError

NUM_BUCKETS = 5
_DOCS_PER_ENTITY_SCALE = 0.23  # A = this * num_entities: the head entity's extra documents
_ZIPF_EXPONENT = 0.9
_FILLER_DOCUMENT_FRACTION = 0.15
_KIND_WEIGHTS = (("element", 0.4), ("person", 0.35), ("city", 0.25))

_ONSETS = (
    "b",
    "br",
    "c",
    "ch",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "h",
    "k",
    "kr",
    "l",
    "m",
    "n",
    "p",
    "pr",
    "r",
    "s",
    "sh",
    "st",
    "t",
    "tr",
    "th",
    "v",
    "z",
    "zh",
    "qu",
)
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou", "y")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "x", "m", "k")
_ELEMENT_ENDINGS = ("ium", "on", "ine", "ite", "ogen", "yx")
_CITY_ENDINGS = ("", "ford", "burg", "ora", "heim", "mouth", "vale", "port")
_FIRST_NAMES = (
    "Ada",
    "Boris",
    "Celia",
    "Dmitri",
    "Elin",
    "Farid",
    "Greta",
    "Hugo",
    "Ines",
    "Jonas",
    "Kira",
    "Lorenz",
    "Mira",
    "Nils",
    "Olga",
    "Pavel",
    "Quinn",
    "Rosa",
    "Sven",
    "Talia",
    "Ugo",
    "Vera",
    "Wim",
    "Xenia",
    "Yusuf",
    "Zora",
    "Anton",
    "Beatrix",
    "Cyril",
    "Dora",
    "Emil",
    "Flora",
    "Gustav",
    "Helena",
    "Ivo",
    "Johanna",
    "Karel",
    "Lena",
    "Matteo",
    "Nadia",
)
_PROFESSIONS = (
    "chemist",
    "physicist",
    "cartographer",
    "botanist",
    "engineer",
    "astronomer",
    "geologist",
    "physician",
    "mathematician",
    "architect",
    "historian",
    "poet",
)
_COLORS = (
    "silvery",
    "pale yellow",
    "deep blue",
    "grey",
    "reddish",
    "greenish",
    "black",
    "white",
    "violet",
    "copper-colored",
)
_STATES = ("solid", "liquid", "gas")
_RIVER_SUFFIX = " River"

_EVERYDAY_SUBJECTS = (
    "The farmer",
    "A teacher",
    "The old sailor",
    "My neighbour",
    "The baker",
    "A young student",
    "The mayor",
    "Her brother",
    "The travellers",
    "The children",
)
_EVERYDAY_VERBS = (
    "carried",
    "painted",
    "found",
    "sold",
    "cleaned",
    "borrowed",
    "repaired",
    "counted",
    "opened",
    "brought",
)
_EVERYDAY_OBJECTS = (
    "the basket",
    "a small boat",
    "the wooden door",
    "two bags of flour",
    "the old map",
    "a letter",
    "the garden gate",
    "three lamps",
    "the bicycle",
    "a box of apples",
)
_EVERYDAY_PLACES = (
    "at the market",
    "near the harbour",
    "in the morning",
    "before dinner",
    "after the rain",
    "in the village square",
    "on the hill",
    "by the river",
    "during the festival",
    "at the station",
)
_COMMON_FACTS = (
    "Water freezes at zero degrees Celsius and boils at one hundred degrees at sea level.",
    "A week has seven days, and a year has twelve months.",
    "The sun rises in the east and sets in the west.",
    "Plants need light, water and air to grow.",
    "A triangle has three sides and a square has four.",
    "Most birds can fly, but penguins and ostriches cannot.",
    "Ice is lighter than water, so it floats.",
    "An hour has sixty minutes, and a minute has sixty seconds.",
    "The moon goes around the earth about once a month.",
    "Metals usually conduct heat and electricity well.",
    "Rivers flow from higher ground towards the sea.",
    "Winter is colder than summer in most places far from the equator.",
)
_NUMBER_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
)
_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)


@dataclasses.dataclass
class Entity:
    """One invented entity; `attributes` values are ints, strs, or other entities' indices."""

    index: int
    kind: str
    name: str
    rank: int  # Zipf rank, 1 = most documents
    attributes: dict[str, object]
    mentions: int = 0
    bucket: int = -1


def _entity_index(attribute: object) -> int:
    """An attribute value that refers to another entity: that entity's index."""
    assert isinstance(attribute, int), attribute
    return attribute


@dataclasses.dataclass(frozen=True)
class Probe:
    """A prompt whose correct continuation starts with the integer `answer`."""

    prompt: str
    answer: str
    entity: str
    kind: str
    bucket: int
    mentions: int
    documents: tuple[str, ...] = ()  # ids of the training documents that state the answer


@dataclasses.dataclass
class Corpus:
    documents: list[Document]
    probes: list[Probe]
    entities: list[Entity]

    def num_characters(self) -> int:
        return sum(len(document.text) for document in self.documents)


def write_probes(probes: Iterable[Probe], path: str) -> int:
    """Writes probes as jsonl (one object per line); returns how many."""
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        for probe in probes:
            handle.write(json.dumps(dataclasses.asdict(probe)) + "\n")
            count += 1
    return count


def read_probes(path: str) -> list[Probe]:
    with paths.open_file(path, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [Probe(**{**row, "documents": tuple(row.get("documents", ()))}) for row in rows]


def generate_corpus(num_entities: int, seed: int) -> Corpus:
    """The whole corpus for (num_entities, seed); the same arguments give identical output."""
    if num_entities < NUM_BUCKETS:
        raise ConfigError(
            f"The embedded corpus needs at least {NUM_BUCKETS} entities (one per frequency "
            f"bucket), got {num_entities}; raise DataConfig.embedded_entities."
        )
    return _Generator(num_entities, seed).run()


@functools.lru_cache(maxsize=1)
def cached_corpus(num_entities: int, seed: int) -> Corpus:
    """`generate_corpus`, remembered: prepare reads the corpus in several passes.

    Callers must not mutate the result (documents are frozen; leave the lists alone).
    """
    return generate_corpus(num_entities, seed)


class _Generator:
    def __init__(self, num_entities: int, seed: int) -> None:
        self.random = random.Random(seed)
        self.num_entities = num_entities
        self.entities: list[Entity] = []
        self.used_names: set[str] = set()
        self.stated: set[int] = set()  # entities whose probed fact the current text states

    # ----- the world -------------------------------------------------------------------
    def run(self) -> Corpus:
        self._create_entities()
        documents = self._write_documents()
        self._assign_buckets()
        probes = [self._probe(entity) for entity in self.entities]
        return Corpus(documents=documents, probes=probes, entities=self.entities)

    def _syllables(self, count: int) -> str:
        return "".join(
            self.random.choice(_ONSETS) + self.random.choice(_VOWELS) + self.random.choice(_CODAS)
            for _ in range(count)
        )

    def _unique_name(self, make: Callable[[], str]) -> str:
        while True:
            name = make()
            if name not in self.used_names and len(name) > 3:
                self.used_names.add(name)
                return name

    def _make_name(self, kind: str) -> str:
        if kind == "element":
            return self._unique_name(
                lambda: (
                    self._syllables(self.random.randint(1, 2))
                    + self.random.choice(_ELEMENT_ENDINGS)
                ).title()
            )
        if kind == "person":
            return self._unique_name(
                lambda: (
                    self.random.choice(_FIRST_NAMES)
                    + " "
                    + self._syllables(self.random.randint(2, 3)).title()
                )
            )
        return self._unique_name(
            lambda: (
                self._syllables(self.random.randint(1, 2)) + self.random.choice(_CITY_ENDINGS)
            ).title()
        )

    def _create_entities(self) -> None:
        kinds = [kind for kind, _ in _KIND_WEIGHTS]
        weights = [weight for _, weight in _KIND_WEIGHTS]
        ranks = list(range(1, self.num_entities + 1))
        self.random.shuffle(ranks)
        for index in range(self.num_entities):
            kind = (
                kinds[index % len(kinds)]
                if index < len(kinds)
                else self.random.choices(kinds, weights)[0]
            )
            self.entities.append(
                Entity(
                    index=index,
                    kind=kind,
                    name=self._make_name(kind),
                    rank=ranks[index],
                    attributes={},
                )
            )
        by_kind = {kind: [e.index for e in self.entities if e.kind == kind] for kind in kinds}
        countries = [
            self._unique_name(lambda: self._syllables(2).title() + "ia")
            for _ in range(max(4, self.num_entities // 150))
        ]
        atomic_numbers = self.random.sample(
            range(1, max(1000, 2 * len(by_kind["element"]))), len(by_kind["element"])
        )
        for entity in self.entities:
            attributes = entity.attributes
            if entity.kind == "element":
                attributes.update(
                    atomic_number=atomic_numbers.pop(),
                    discovery_year=self.random.randint(1650, 1990),
                    discovered_in=self.random.choice(by_kind["city"]),
                    discoverer=self.random.choice(by_kind["person"]),
                    color=self.random.choice(_COLORS),
                    state=self.random.choice(_STATES),
                )
            elif entity.kind == "person":
                mentors = [i for i in by_kind["person"] if i != entity.index]
                attributes.update(
                    birth_year=self.random.randint(1600, 1960),
                    birthplace=self.random.choice(by_kind["city"]),
                    profession=self.random.choice(_PROFESSIONS),
                    mentor=self.random.choice(mentors),
                )
            else:
                attributes.update(
                    country=self.random.choice(countries),
                    founded_year=self.random.randint(900, 1900),
                    population=self.random.randint(2, 900) * 1000 + self.random.randint(0, 999),
                    river=self._syllables(2).title() + _RIVER_SUFFIX,
                )

    def _name(self, entity_index: int) -> str:
        """An entity's name for insertion into text; every use is counted as a mention."""
        entity = self.entities[entity_index]
        entity.mentions += 1
        return entity.name

    def _referenced(self, attribute: object) -> str:
        """`_name` of the entity an attribute value refers to by index."""
        return self._name(_entity_index(attribute))

    # ----- facts, phrased ---------------------------------------------------------------
    def _fact_sentences(
        self, entity: Entity, count: int | None = None, only: int | None = None
    ) -> list[str]:
        """One sentence per attribute (or `count` random attributes), each a random paraphrase.

        Paraphrases are lambdas so only the chosen one runs: names are counted
        when they are written, and an unused paraphrase must not count.
        """
        a = entity.attributes
        n = lambda: self._name(entity.index)  # noqa: E731 - counted at each use
        ref = self._referenced
        stated = functools.partial(self._stating, entity.index)
        if entity.kind == "element":
            number = stated(a["atomic_number"])
            options = [
                (
                    lambda: f"The atomic number of {n()} is {number()}.",
                    lambda: f"The atomic number of {n()} is {number()}.",
                    lambda: f"{n()} has atomic number {number()}.",
                    lambda: f"{n()} is element number {number()} of the periodic table.",
                    lambda: f"With an atomic number of {number()}, {n()} is easy to place.",
                ),
                (
                    lambda: f"{n()} was discovered in {a['discovery_year']}.",
                    lambda: f"The discovery of {n()} dates to {a['discovery_year']}.",
                    lambda: f"In {a['discovery_year']}, {n()} was first isolated.",
                ),
                (
                    lambda: f"{n()} was first found in {ref(a['discovered_in'])}.",
                    lambda: f"The first samples of {n()} came from {ref(a['discovered_in'])}.",
                ),
                (
                    lambda: f"{n()} was discovered by {ref(a['discoverer'])}.",
                    lambda: f"{ref(a['discoverer'])} is credited with the discovery of {n()}.",
                ),
                (
                    lambda: f"At room temperature {n()} is a {a['color']} {a['state']}.",
                    lambda: f"{n()} appears as a {a['color']} {a['state']} in normal conditions.",
                ),
            ]
        elif entity.kind == "person":
            year = stated(a["birth_year"])
            options = [
                (
                    lambda: f"{n()} was born in the year {year()}.",
                    lambda: f"{n()} was born in the year {year()}.",
                    lambda: f"{n()} was born in {year()}.",
                    lambda: f"The birth year of {n()} is {year()}.",
                ),
                (
                    lambda: f"{n()} was born in {ref(a['birthplace'])}.",
                    lambda: f"{n()} grew up in {ref(a['birthplace'])}, the city of birth.",
                ),
                (
                    lambda: f"{n()} worked as a {a['profession']}.",
                    lambda: f"By profession {n()} was a {a['profession']}.",
                ),
                (
                    lambda: f"{n()} studied under {ref(a['mentor'])}.",
                    lambda: f"The mentor of {n()} was {ref(a['mentor'])}.",
                ),
            ]
        else:
            year = stated(a["founded_year"])
            options = [
                (
                    lambda: f"{n()} was founded in the year {year()}.",
                    lambda: f"{n()} was founded in the year {year()}.",
                    lambda: f"The city of {n()} dates from {year()}.",
                    lambda: f"{n()} was founded in {year()}.",
                ),
                (
                    lambda: f"{n()} is a city in {a['country']}.",
                    lambda: f"{n()} lies in {a['country']}.",
                ),
                (
                    lambda: f"{n()} has a population of {a['population']}.",
                    lambda: f"About {a['population']} people live in {n()}.",
                ),
                (
                    lambda: f"{n()} stands on the {a['river']}.",
                    lambda: f"The {a['river']} flows through {n()}.",
                ),
            ]
        if only is not None:  # attribute 0 is the probed one
            options = [options[only]]
        elif count is not None:
            chosen = sorted(self.random.sample(range(len(options)), k=min(count, len(options))))
            options = [options[i] for i in chosen]
        return [self.random.choice(paraphrases)() for paraphrases in options]

    def _stating(self, entity_index: int, value: object) -> Callable[[], object]:
        """`value` for a sentence that states the entity's probed fact, which is recorded."""

        def write() -> object:
            self.stated.add(entity_index)
            return value

        return write

    def _introduction(self, entity: Entity) -> str:
        a = entity.attributes
        if entity.kind == "element":
            return f"{self._name(entity.index)} is a chemical element."
        if entity.kind == "person":
            return f"{self._name(entity.index)} was a {a['profession']}."
        return f"{self._name(entity.index)} is a city in {a['country']}."

    def _questions(self, entity: Entity, count: int) -> list[str]:
        """`count` question/answer pairs about the entity (lambdas: only those used count)."""
        a = entity.attributes
        n = lambda: self._name(entity.index)  # noqa: E731
        ref = self._referenced
        stated = functools.partial(self._stating, entity.index)
        if entity.kind == "element":
            pairs = [
                lambda: (f"What is the atomic number of {n()}?", stated(a["atomic_number"])()),
                lambda: (f"When was {n()} discovered?", a["discovery_year"]),
                lambda: (f"Who discovered {n()}?", ref(a["discoverer"])),
            ]
        elif entity.kind == "person":
            pairs = [
                lambda: (f"In which year was {n()} born?", stated(a["birth_year"])()),
                lambda: (f"Where was {n()} born?", ref(a["birthplace"])),
                lambda: (f"What was the profession of {n()}?", a["profession"]),
            ]
        else:
            pairs = [
                lambda: (f"When was {n()} founded?", stated(a["founded_year"])()),
                lambda: (f"In which country is {n()}?", a["country"]),
                lambda: (f"Which river flows through {n()}?", a["river"]),
            ]
        self.random.shuffle(pairs)
        return ["Question: {}\nAnswer: {}.".format(*make()) for make in pairs[:count]]

    def _related(self, entity: Entity) -> list[int]:
        return [
            _entity_index(value)
            for key, value in entity.attributes.items()
            if key in ("discovered_in", "discoverer", "birthplace", "mentor")
        ]

    # ----- common knowledge -------------------------------------------------------------
    def _filler_sentence(self) -> str:
        pick = self.random.choice
        style = self.random.randrange(6)
        if style == 0:
            return pick(_COMMON_FACTS)
        if style == 1:
            x, y = self.random.randint(0, 6), self.random.randint(0, 6)
            return f"{_NUMBER_WORDS[x].capitalize()} plus {_NUMBER_WORDS[y]} is {x + y}."
        if style == 2:
            x, y = self.random.randint(2, 40), self.random.randint(2, 40)
            return f"{x} plus {y} equals {x + y}, and {x} times {y} equals {x * y}."
        if style == 3:
            month = self.random.randrange(12)
            return f"The month after {_MONTHS[month]} is {_MONTHS[(month + 1) % 12]}."
        if style == 4:
            year = self.random.randint(1000, 2000)
            return f"The year after {year} was {year + 1}, and the year before was {year - 1}."
        return (
            f"{pick(_EVERYDAY_SUBJECTS)} {pick(_EVERYDAY_VERBS)} {pick(_EVERYDAY_OBJECTS)} "
            f"{pick(_EVERYDAY_PLACES)}."
        )

    def _filler(self, low: int, high: int) -> list[str]:
        return [self._filler_sentence() for _ in range(self.random.randint(low, high))]

    # ----- documents --------------------------------------------------------------------
    def _article(self, entity: Entity) -> str:
        facts = self._fact_sentences(entity)
        self.random.shuffle(facts)
        body = [self._introduction(entity)] + facts + self._filler(1, 3)
        return f"{self._name(entity.index)}\n\n" + " ".join(body)

    def _news(self, entity: Entity) -> str:
        chosen = self._fact_sentences(entity, self.random.randint(2, 3))
        year = self.random.randint(1900, 2020)
        opening = self.random.choice(
            (
                f"A report from {year} returned to a familiar subject.",
                f"Local newspapers wrote about it again in {year}.",
                "Visitors often ask about this.",
            )
        )
        return " ".join([opening] + self._filler(1, 2) + chosen + self._filler(1, 2))

    def _snippet(self, entity: Entity, attribute: int | None) -> str:
        """A short passage in which one fact names the entity (attribute None: a random one)."""
        if attribute is None:
            fact = self._fact_sentences(entity, 1)
        else:
            fact = self._fact_sentences(entity, only=attribute)
        return " ".join(self._filler(0, 1) + fact)

    def _question_answer(self, entity: Entity) -> str:
        questions = self._questions(entity, self.random.randint(2, 3))
        return "\n".join(questions + self._filler(0, 1))

    def _listing(self, entity: Entity) -> str:
        related = self._related(entity)
        lines = [f"Notes on {self._name(entity.index)} and related entries:"]
        for index in [entity.index] + related:
            lines.append("- " + self._fact_sentences(self.entities[index], 1)[0])
        return "\n".join(lines + self._filler(0, 2))

    def _write_documents(self) -> list[Document]:
        scale = _DOCS_PER_ENTITY_SCALE * self.num_entities
        styles = (self._news, self._question_answer, self._listing, self._article)
        texts: list[tuple[str, frozenset[int]]] = []

        def write(make: Callable[[], str]) -> None:
            self.stated = set()
            texts.append((make(), frozenset(self.stated)))

        for entity in self.entities:
            write(functools.partial(self._article, entity))  # every fact is stated at least once
            for attribute in (0, None, 0, None):  # the floor: short passages, fact first-named
                write(functools.partial(self._snippet, entity, attribute))
            expected_extra = scale / entity.rank**_ZIPF_EXPONENT
            extra = int(expected_extra) + (self.random.random() < expected_extra % 1)
            for _ in range(extra):
                write(functools.partial(self.random.choice(styles), entity))
        for _ in range(int(_FILLER_DOCUMENT_FRACTION * len(texts))):
            write(lambda: " ".join(self._filler(4, 10)))
        self.random.shuffle(texts)
        documents = []
        self.fact_documents: dict[int, list[str]] = {e.index: [] for e in self.entities}
        for number, (text, stated) in enumerate(texts):
            documents.append(Document(id=f"encyclopedia-{number:06d}", text=text))
            for index in sorted(stated):
                self.fact_documents[index].append(documents[-1].id)
        return documents

    # ----- frequency buckets and probes --------------------------------------------------
    def _assign_buckets(self) -> None:
        """Quintiles of mention count (ties broken by Zipf rank): bucket 0 is the rarest."""
        order = sorted(self.entities, key=lambda e: (e.mentions, -e.rank))
        for position, entity in enumerate(order):
            entity.bucket = position * NUM_BUCKETS // len(order)

    def _probe(self, entity: Entity) -> Probe:
        a = entity.attributes
        prompt, answer = {
            "element": (f"The atomic number of {entity.name} is", a.get("atomic_number")),
            "person": (f"{entity.name} was born in the year", a.get("birth_year")),
            "city": (f"{entity.name} was founded in the year", a.get("founded_year")),
        }[entity.kind]
        return Probe(
            prompt=prompt,
            answer=str(answer),
            entity=entity.name,
            kind=entity.kind,
            bucket=entity.bucket,
            mentions=entity.mentions,
            documents=tuple(self.fact_documents[entity.index]),
        )
