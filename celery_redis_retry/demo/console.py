"""The demo's terminal output: timeline lines, a live status line, the progress bar and the table.

Plain text and no dependency. On a terminal the status line is redrawn in place; when
stdout is a pipe or a file (CI, ``| tee``), it is printed as a line every second instead.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

from celery_redis_retry.demo.verify import Accounting


class Console:
    """Timeline lines stamped with the seconds since the story began, and one live status line."""

    def __init__(self, out: TextIO | None = None, every: float = 1.0) -> None:
        self.out = out or sys.stdout
        self.tty = self.out.isatty()
        self.every = every
        self.t0 = time.monotonic()
        self._status_shown = False
        self._last_status = 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, text: str = "") -> None:
        """A line that stays."""
        self._clear()
        print(text, file=self.out, flush=True)

    def event(self, text: str) -> None:
        """A timeline line: ``[  4.0 s] text``."""
        self.say(f"[{self.elapsed():6.1f} s] {text}")

    def status(self, text: str, *, force: bool = False) -> None:
        """The live line: redrawn in place on a terminal, else printed at most every second."""
        now = time.monotonic()
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns - 1
            self.out.write("\r" + text[:width].ljust(width))
            self.out.flush()
            self._status_shown = True
        elif force or now - self._last_status >= self.every:
            self._last_status = now
            print(f"           {text}", file=self.out, flush=True)

    def _clear(self) -> None:
        if self._status_shown:
            self.out.write("\r" + " " * (shutil.get_terminal_size((100, 20)).columns - 1) + "\r")
            self._status_shown = False


def bar(done: int, total: int, width: int = 30) -> str:
    """``[##########..........]  512/1024  50%``."""
    fraction = 1.0 if total == 0 else done / total
    filled = round(width * fraction)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done:>6}/{total:<6} {fraction:4.0%}"


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items())) or "-"


def table(acc: Accounting, *, topic: str, dlq_topic: str) -> str:
    """The accounting table the demo ends with: each count named, and the rows add up as printed
    (``writes attempted`` is the sum of its three parts, ``published`` of the five rows below it)."""
    dead = sum(acc.dead.values())
    rejected = sum(acc.rejected.values())
    drain = "-" if acc.drain_seconds is None else f"{acc.drain_seconds:.1f} s"
    failed = f" + {acc.failed} failed, not captured" if acc.failed else ""
    rows = [
        ("writes attempted", acc.attempted,
         f"= {acc.direct} applied at once + {acc.captured} captured + {acc.refused} refused at once "
         f"(an error no retry fixes: not captured){failed}"),
        ("published", acc.published,
         f"of {acc.captured} captured, each read back from {topic}; = the 5 rows below"),
        ("applied", acc.applied, "replayed; each seen in Redis (value, or dedupe marker)"),
        ("expired", acc.expired, "cache entries whose TTL ran out before the replay"),
        ("superseded", acc.superseded, "replays a newer write had overtaken: the newer write stays"),
        ("dead", dead, f"in {dlq_topic}: Redis refused the replay: {_reasons(acc.dead)}"),
        ("rejected", rejected, f"in {dlq_topic}: the bridge refused the op: {_reasons(acc.rejected)}"),
        ("foreign message", acc.foreign,
         f"put onto {topic} by the demo, not captured (a newer client's); rejected: "
         f"{_reasons(acc.foreign_rejected)}"),
        ("lost", acc.lost, "must be 0"),
        ("newer writes overwritten", acc.overwritten,
         f"must be 0; {acc.hot_keys} hot keys written during the outage and again as Redis came back"),
        ("duplicate effects", acc.duplicates, f"over {acc.totals_checked} counters, scores and set members"),
        ("time to drain", drain, "Redis back -> every captured op applied or dead-lettered"),
    ]
    width = max(len(name) for name, _, _ in rows) + 2
    lines = [f"  {name:<{width}}{value!s:>8}   {note}" for name, value, note in rows]
    rule = "  " + "-" * (width + 8 + 3 + max(len(note) for _, _, note in rows))
    return "\n".join([rule, *lines, rule])
