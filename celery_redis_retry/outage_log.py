"""Few lines per outage: when it starts, a count at most once a minute, when it ends.

Something that fails over and over (a broker refusing connections, a Redis target
refusing writes) is worth one line when it starts failing and one when it is back; in
between, the failures are counted and told at most once per :data:`SUMMARY_INTERVAL`.
:class:`Outages` keeps that count per thing (a ``host:port``, a target name) and tells
its caller which line is due; the caller words it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["SUMMARY_INTERVAL", "UNKNOWN_TARGET_INTERVAL", "Outage", "Outages", "UnknownTargetLog"]

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


#: How often a bridge says again that it meets ops for targets it does not know (seconds).
UNKNOWN_TARGET_INTERVAL = 600.0


class UnknownTargetLog:
    """What a bridge says of ops for targets its app does not define: once per target,
    then once per :data:`UNKNOWN_TARGET_INTERVAL` with a count, naming the likely cause.

    Two apps with the default settings share the topic and the consumer group, so each
    one's bridge meets the other's ops. Each such op still becomes a ``rejected`` DLQ record.
    """

    def __init__(self, logger: logging.Logger, topic: str, *, interval: float = UNKNOWN_TARGET_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.topic = topic
        self._seen = Outages(clock=clock, interval=interval)

    def met(self, target: str) -> None:
        """An op for ``target``, which this app does not define, was read (and rejected)."""
        due = self._seen.failed(target)
        if due is None:
            return
        what, seen = due
        count = "" if what == "started" else (
            f"{seen.untold} more in the last {self._seen.seconds(seen, seen.told_at) / 60:.0f} min, "
            f"{seen.total} since the first; "
        )
        self.logger.warning(
            "ops for target %r which this app does not define (%sthey go to the DLQ as rejected): another app may "
            "publish to topic %s; give each app its own redis_retry_topic and redis_retry_consumer_group",
            target, count, self.topic,
        )
