"""`Document`: the unit every source yields and preparation embeds, routes and packs.

Its own module so that the sources (`sources.py`) and the synthetic corpus
(`encyclopedia.py`) both depend on it rather than on each other.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Document:
    """One unit of text that is embedded, routed and packed as a whole."""

    id: str
    text: str
