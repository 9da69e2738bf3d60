"""The progress of a long ``dlq replay`` on stderr: a bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any, TextIO

#: Fewer records than this are replayed without a progress display.
MIN_RECORDS = 20

#: Seconds between two plain progress lines.
LINE_EVERY = 1.0


class ReplayProgress:
    """Records done of ``total``, with the rate and the time left.

    A rich progress bar when ``stream`` is a terminal, one line a second otherwise
    (logs, pipes), nothing for fewer than :data:`MIN_RECORDS` records.
    """

    def __init__(self, total: int, *, stream: TextIO | None = None) -> None:
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.shown = total >= MIN_RECORDS
        self._bar: Any = None
        self._task: Any = None
        self._started = self._last_line = time.monotonic()

    def __enter__(self) -> ReplayProgress:
        if self.shown and self.stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(
                TextColumn("replaying"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:.1f} ops/s"), TimeRemainingColumn(),
                console=Console(file=self.stream),
            )
            self._bar.start()
            self._task = self._bar.add_task("replay", total=self.total, rate=0.0)
        return self

    def update(self, done: int) -> None:
        """``done`` records of the total are published."""
        if not self.shown:
            return
        now = time.monotonic()
        rate = done / max(now - self._started, 1e-6)
        if self._bar is not None:
            self._bar.update(self._task, completed=done, rate=rate)
        elif now - self._last_line >= LINE_EVERY or done == self.total:
            self._last_line = now
            left = (self.total - done) / rate if rate else 0.0
            self.stream.write(f"replayed {done}/{self.total}, {rate:.1f} ops/s, {left:.0f} s left\n")
            self.stream.flush()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()
