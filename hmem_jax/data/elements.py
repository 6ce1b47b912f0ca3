"""The 118 chemical elements, and how often a corpus names each: the paper's atomic-number probe.

The paper's long-tail probe asks "The atomic number of {element} is" for all
118 elements and buckets the elements by how often their names (with
aliases) occur in the training data. `prepare` counts the names in every
document it packs (`ElementCounter`) and stores the counts in the prepared
folder (`element_counts.json`), so the probe of a run trained on real text
is bucketed by that run's own corpus (hmem_jax/infer/probe.py,
`element_probes`). Names are matched as whole words, case-insensitively.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable

COUNTS_FILE = "element_counts.json"

# (atomic number, name, other spellings). Written for this project from the periodic table.
ELEMENTS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (1, "Hydrogen", ()),
    (2, "Helium", ()),
    (3, "Lithium", ()),
    (4, "Beryllium", ()),
    (5, "Boron", ()),
    (6, "Carbon", ()),
    (7, "Nitrogen", ()),
    (8, "Oxygen", ()),
    (9, "Fluorine", ()),
    (10, "Neon", ()),
    (11, "Sodium", ("Natrium",)),
    (12, "Magnesium", ()),
    (13, "Aluminium", ("Aluminum",)),
    (14, "Silicon", ()),
    (15, "Phosphorus", ()),
    (16, "Sulfur", ("Sulphur",)),
    (17, "Chlorine", ()),
    (18, "Argon", ()),
    (19, "Potassium", ("Kalium",)),
    (20, "Calcium", ()),
    (21, "Scandium", ()),
    (22, "Titanium", ()),
    (23, "Vanadium", ()),
    (24, "Chromium", ()),
    (25, "Manganese", ()),
    (26, "Iron", ()),
    (27, "Cobalt", ()),
    (28, "Nickel", ()),
    (29, "Copper", ()),
    (30, "Zinc", ()),
    (31, "Gallium", ()),
    (32, "Germanium", ()),
    (33, "Arsenic", ()),
    (34, "Selenium", ()),
    (35, "Bromine", ()),
    (36, "Krypton", ()),
    (37, "Rubidium", ()),
    (38, "Strontium", ()),
    (39, "Yttrium", ()),
    (40, "Zirconium", ()),
    (41, "Niobium", ("Columbium",)),
    (42, "Molybdenum", ()),
    (43, "Technetium", ()),
    (44, "Ruthenium", ()),
    (45, "Rhodium", ()),
    (46, "Palladium", ()),
    (47, "Silver", ()),
    (48, "Cadmium", ()),
    (49, "Indium", ()),
    (50, "Tin", ()),
    (51, "Antimony", ()),
    (52, "Tellurium", ()),
    (53, "Iodine", ()),
    (54, "Xenon", ()),
    (55, "Caesium", ("Cesium",)),
    (56, "Barium", ()),
    (57, "Lanthanum", ()),
    (58, "Cerium", ()),
    (59, "Praseodymium", ()),
    (60, "Neodymium", ()),
    (61, "Promethium", ()),
    (62, "Samarium", ()),
    (63, "Europium", ()),
    (64, "Gadolinium", ()),
    (65, "Terbium", ()),
    (66, "Dysprosium", ()),
    (67, "Holmium", ()),
    (68, "Erbium", ()),
    (69, "Thulium", ()),
    (70, "Ytterbium", ()),
    (71, "Lutetium", ()),
    (72, "Hafnium", ()),
    (73, "Tantalum", ()),
    (74, "Tungsten", ("Wolfram",)),
    (75, "Rhenium", ()),
    (76, "Osmium", ()),
    (77, "Iridium", ()),
    (78, "Platinum", ()),
    (79, "Gold", ()),
    (80, "Mercury", ()),
    (81, "Thallium", ()),
    (82, "Lead", ()),
    (83, "Bismuth", ()),
    (84, "Polonium", ()),
    (85, "Astatine", ()),
    (86, "Radon", ()),
    (87, "Francium", ()),
    (88, "Radium", ()),
    (89, "Actinium", ()),
    (90, "Thorium", ()),
    (91, "Protactinium", ()),
    (92, "Uranium", ()),
    (93, "Neptunium", ()),
    (94, "Plutonium", ()),
    (95, "Americium", ()),
    (96, "Curium", ()),
    (97, "Berkelium", ()),
    (98, "Californium", ()),
    (99, "Einsteinium", ()),
    (100, "Fermium", ()),
    (101, "Mendelevium", ()),
    (102, "Nobelium", ()),
    (103, "Lawrencium", ()),
    (104, "Rutherfordium", ()),
    (105, "Dubnium", ()),
    (106, "Seaborgium", ()),
    (107, "Bohrium", ()),
    (108, "Hassium", ()),
    (109, "Meitnerium", ()),
    (110, "Darmstadtium", ()),
    (111, "Roentgenium", ()),
    (112, "Copernicium", ()),
    (113, "Nihonium", ()),
    (114, "Flerovium", ()),
    (115, "Moscovium", ()),
    (116, "Livermorium", ()),
    (117, "Tennessine", ()),
    (118, "Oganesson", ()),
)


class ElementCounter:
    """Counts whole-word, case-insensitive mentions of each element's name or alias."""

    def __init__(self) -> None:
        self._element_of: dict[str, str] = {}
        for _, name, aliases in ELEMENTS:
            for spelling in (name,) + aliases:
                self._element_of[spelling.lower()] = name
        spellings = sorted(self._element_of, key=len, reverse=True)
        self._pattern = re.compile(r"\b(" + "|".join(spellings) + r")\b", re.IGNORECASE)
        self.counts: dict[str, int] = {name: 0 for _, name, _ in ELEMENTS}

    def add(self, texts: Iterable[str]) -> None:
        for text in texts:
            for match in self._pattern.finditer(text):
                self.counts[self._element_of[match.group(1).lower()]] += 1

    def save(self, directory: str) -> str:
        return save_counts(self.counts, directory)


def save_counts(counts: dict[str, int], directory: str) -> str:
    """Store element-name counts in a prepared folder (`read_counts` reads them)."""
    path = os.path.join(directory, COUNTS_FILE)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(counts, handle, indent=1)
    return path


def read_counts(prepared_dir: str) -> dict[str, int] | None:
    """The element-name counts `prepare` stored, or None for data prepared without them."""
    from hmem_jax import paths

    path = paths.join(prepared_dir, COUNTS_FILE)
    if not paths.isfile(path):
        return None
    return {str(k): int(v) for k, v in json.loads(paths.read_text(path)).items()}


def frequency_buckets(counts: dict[str, int], num_buckets: int = 5) -> dict[str, int]:
    """Element name -> bucket: equal-size groups by count (0 = rarest; ties by atomic number)."""
    order = sorted(ELEMENTS, key=lambda element: (counts.get(element[1], 0), element[0]))
    return {
        name: position * num_buckets // len(order) for position, (_, name, _) in enumerate(order)
    }
