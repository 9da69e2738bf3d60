"""Few lines per outage: when it starts, a count at most once a minute, when it ends.

Something that fails over and over (a broker refusing connections, a Redis target
refusing writes) is worth one line when it starts failing and one when it is back; in
between, the failures are counted and told at most once per :data:`SUMMARY_INTERVAL`.
:class:`Outages` keeps that count per thing (a ``host:port``, a target name) and tells
its caller which line is due; the caller words it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["SUMMARY_INTERVAL", "Outage", "Outages"]

#: Repeats are told at most this often (seconds).
SUMMARY_INTERVAL = 60.0


@dataclass
class Outage:
    """One thing failing since :attr:`since` (a monotonic time)."""

    since: float
    told_at: float
    #: Failures since the last line about it.
    untold: int = 0
    #: Failures since it started.
    total: int = 1


class Outages:
    """The outages of the things a process uses, keyed by what it calls them. Thread-safe."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, interval: float = SUMMARY_INTERVAL) -> None:
        self.clock = clock
        self.interval = interval
        self._lock = threading.Lock()
        self._open: dict[str, Outage] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._open

    def __bool__(self) -> bool:
        return bool(self._open)

    @property
    def keys(self) -> list[str]:
        """What is failing now."""
        with self._lock:
            return sorted(self._open)

    def failed(self, key: str) -> tuple[str, Outage] | None:
        """Count a failure of ``key``; what to tell: ``("started", outage)`` for its first,
        ``("ongoing", outage)`` once an interval passed since the last line (its
        :attr:`Outage.untold` failures, then reset), None while it is to be counted only."""
        now = self.clock()
        with self._lock:
            outage = self._open.get(key)
            if outage is None:
                outage = self._open[key] = Outage(since=now, told_at=now)
                return "started", outage
            outage.untold += 1
            outage.total += 1
            if now - outage.told_at < self.interval:
                return None
            told = Outage(outage.since, outage.told_at, outage.untold, outage.total)
            outage.untold, outage.told_at = 0, now
            return "ongoing", told

    def ended(self, key: str) -> Outage | None:
        """``key`` works again: its outage, if it had one (then closed)."""
        if key not in self._open:  # the usual case, without the lock
            return None
        with self._lock:
            return self._open.pop(key, None)

    def seconds(self, outage: Outage, since: float | None = None) -> float:
        """How long ago ``since`` (default: the outage's start) was."""
        return self.clock() - (outage.since if since is None else since)
