"""A byte-bounded host RAM cache of bank blocks, with retention that favours shallow levels.

Why level-aware: every sequence of a step uses one block per level, so a
level-1 block (16 of them) is reused almost every step while a level-3 block
(4,096) is rarely seen twice in a row. Eviction therefore drops the deepest
level's blocks first and, within a level, the least recently used.

Correctness rules (docs/bank.md):
- a dirty block (updated by a step, not yet durable in the store) is never
  evicted, so a block absent from the cache is up to date in the store;
- every update bumps the block's epoch; a store read started before an update
  (a prefetch racing with the step that updates the block) is dropped on
  insertion instead of overwriting the newer value.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable, Mapping

import numpy as np

Key = tuple[str, int]  # (level key, block id)
Rows = Mapping[str, np.ndarray]  # field -> one block's value


def level_depth(level_key: str) -> int:
    """'l3' -> 3; the generic block (used by every sequence that takes it) counts as 0."""
    return int(level_key[1:]) if level_key.startswith("l") else 0


@dataclasses.dataclass
class _Entry:
    rows: dict[str, np.ndarray]
    nbytes: int
    dirty: bool
    last_use: int


class BlockCache:
    """Blocks by (level key, id): get, insert a store read, put an update, evict to budget."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = int(capacity_bytes)
        self._entries: dict[Key, _Entry] = {}
        self._epochs: dict[Key, int] = {}
        self._clock = 0
        self._lock = threading.Lock()
        self.nbytes = 0

    def __contains__(self, key: Key) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def epoch(self, key: Key) -> int:
        with self._lock:
            return self._epochs.get(key, 0)

    def get(self, key: Key) -> dict[str, np.ndarray] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._clock += 1
            entry.last_use = self._clock
            return entry.rows

    def insert_read(self, key: Key, rows: Rows, epoch: int) -> bool:
        """Cache a value read from the store when the read started at `epoch`.

        Refused (False) if the block is cached already or was updated since:
        the cached / newer value wins.
        """
        with self._lock:
            if key in self._entries or self._epochs.get(key, 0) != epoch:
                return False
            self._add(key, dict(rows), dirty=False)
            return True

    def put_update(self, key: Key, rows: Rows) -> int:
        """A step's new value of a block (dirty until written back); returns its new epoch."""
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self._epochs[key] = self._epochs.get(key, 0) + 1
            self._add(key, dict(rows), dirty=True)
            return self._epochs[key]

    def mark_clean(self, key: Key, epoch: int) -> None:
        """The value of `epoch` is durable in the store; evictable unless updated since."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and self._epochs.get(key, 0) == epoch:
                entry.dirty = False

    def dirty(self) -> list[tuple[Key, dict[str, np.ndarray], int]]:
        """(key, value, epoch) of every dirty block, shallow levels first, then by id."""
        with self._lock:
            out = [(k, e.rows, self._epochs[k]) for k, e in self._entries.items() if e.dirty]
        return sorted(out, key=lambda item: (level_depth(item[0][0]), item[0]))

    def evict(self, protect: Iterable[Key] = ()) -> int:
        """Drop clean blocks (deepest level first, then least recently used) until within
        budget; blocks in `protect` (the next steps' ids) go last. Returns bytes still over."""
        protected = set(protect)
        with self._lock:
            if self.nbytes <= self.capacity_bytes:
                return 0
            order = sorted(
                (k for k, e in self._entries.items() if not e.dirty),
                key=lambda k: (k in protected, -level_depth(k[0]), self._entries[k].last_use),
            )
            for key in order:
                if self.nbytes <= self.capacity_bytes:
                    break
                self.nbytes -= self._entries.pop(key).nbytes
            return max(0, self.nbytes - self.capacity_bytes)

    def _add(self, key: Key, rows: dict[str, np.ndarray], dirty: bool) -> None:
        self._clock += 1
        nbytes = sum(v.nbytes for v in rows.values())
        self._entries[key] = _Entry(rows, nbytes, dirty, self._clock)
        self.nbytes += nbytes
