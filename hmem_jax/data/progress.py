"""How far a long `prepare` has got: documents, documents/s, files read and an ETA.

A corpus of a billion documents takes hours in one process; whoever waits
needs the rate and the time left, in a terminal and in a job's log alike. On
a terminal this is a tqdm bar; otherwise (a SLURM or Kubernetes log) one line
every `interval_s` seconds and one at the end, since a bar's carriage returns
make a log unreadable. The ETA counts files: the source's files read so far
against all of them, so it is right for corpora cut into shards of similar
size (as DCLM's are) and unknown until the first file is done.
"""

from __future__ import annotations

import datetime
import sys
import time
from typing import IO, Any


class PrepareProgress:
    """Reports documents read and files finished; `close` ends the report."""

    def __init__(
        self,
        files: int,
        enabled: bool = True,
        interval_s: float = 60.0,
        stream: IO[str] | None = None,
    ) -> None:
        self.files, self.enabled, self.interval_s = files, enabled, interval_s
        self.stream = stream if stream is not None else sys.stderr
        self.documents = self.files_done = 0
        self.started = self._last_line = time.perf_counter()
        self._bar: Any = None
        if enabled and self.stream.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(desc="prepare", unit="doc", dynamic_ncols=True, file=self.stream)

    def add_documents(self, count: int) -> None:
        self.documents += count
        if self._bar is not None:
            self._bar.update(count)
        self._maybe_line()

    def file_done(self) -> None:
        self.files_done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(self._files_and_eta(), refresh=False)
        self._maybe_line()

    def eta_seconds(self) -> float | None:
        """Seconds left by the share of files read; None before the first file is done."""
        if not self.files_done:
            return None
        elapsed = time.perf_counter() - self.started
        return elapsed * (self.files - self.files_done) / self.files_done

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        return (
            f"prepare: {self.documents:,} documents, {self.documents / elapsed:,.0f} documents/s, "
            f"{self._files_and_eta()}"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            print(self.line(), file=self.stream, flush=True)

    def _files_and_eta(self) -> str:
        eta = self.eta_seconds()
        left = "unknown" if eta is None else str(datetime.timedelta(seconds=round(eta)))
        return f"file {self.files_done}/{self.files}, ETA {left}"

    def _maybe_line(self) -> None:
        if self._bar is not None or not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last_line >= self.interval_s:
            self._last_line = now
            print(self.line(), file=self.stream, flush=True)
