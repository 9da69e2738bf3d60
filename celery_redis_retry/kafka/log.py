"""librdkafka's log, told once per state change instead of once per reconnect attempt.

A client cut off from its broker retries every few tens of milliseconds, and librdkafka
logs each failed attempt (``FAIL ... Connection refused``): hundreds of lines a minute
per client, with several clients per process. :class:`LibrdkafkaLog` is the ``logger``
the clients built by :mod:`celery_redis_retry.kafka` hand their lines to. It says, for
the whole process:

- one WARNING when a broker (``host:port``) becomes unreachable, naming it;
- at most once a minute, how many more failures it counted meanwhile;
- one INFO when the broker is reachable again, with the outage's length and count.

A broker is reachable again once a client's statistics (``stats_cb``, every
:data:`STATISTICS_INTERVAL_MS`) show a connection to it up. Any other line is logged the
first time and then counted while it repeats (numbers and the client's name aside), its
count told the next time it is logged, a minute later at the earliest.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery_redis_retry.outage_log import SUMMARY_INTERVAL, Outages

__all__ = ["LIBRDKAFKA_LOG", "STATISTICS_INTERVAL_MS", "LibrdkafkaLog"]

#: How often clients report their statistics: how soon a broker back is noticed.
STATISTICS_INTERVAL_MS = 5000

#: The facility librdkafka logs a failed connection or a lost one under.
_CONNECTION_FAILED = "FAIL"

#: ``host:port`` in a FAIL line: "127.0.0.1:9092/bootstrap: Connect to ipv4#127.0.0.1:9092 failed".
_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9._-]*):(\d{1,5})\b")

#: What differs between repeats of one line: numbers (ms, offsets) and the client's name.
_VARYING = re.compile(r"\d+")


@dataclass
class _Repeat:
    told_at: float
    count: int = 0  # not told since


class LibrdkafkaLog:
    """A ``logger`` for librdkafka clients (it calls ``log(level, "%s [%s] %s", fac, client, text)``).

    Shared by every client of the process, so a broker down under five clients is one
    line, not five. Thread-safe: clients are polled from several threads.
    """

    def __init__(
        self, logger: logging.Logger, *, clock: Callable[[], float] = time.monotonic,
        interval: float = SUMMARY_INTERVAL,
    ) -> None:
        self.logger = logger
        self.clock = clock
        self.interval = interval
        self._lock = threading.Lock()
        self._outages = Outages(clock=clock, interval=interval)  # host:port -> since when it is unreachable
        self._repeats: dict[tuple[int, str], _Repeat] = {}

    @property
    def unreachable(self) -> list[str]:
        """The brokers (``host:port``) this process cannot reach now."""
        return self._outages.keys

    def log(self, level: int, _format: str, facility: str = "", client: str = "", text: str = "", *_: Any) -> None:
        """One line of librdkafka's log (the signature of :meth:`logging.Logger.log` as it calls it)."""
        address = _address(text) if facility == _CONNECTION_FAILED else None
        if address is not None:
            self._connection_failed(address, text)
        else:
            with self._lock:
                self._line(level, facility, client, text)

    def statistics(self, document: str) -> None:
        """A client's statistics (``stats_cb``): brokers it is connected to are reachable again."""
        if not self._outages:  # the usual case: nothing to parse for
            return
        try:
            brokers = json.loads(document).get("brokers", {})
        except ValueError:
            return
        up = {str(b.get("nodename")) for b in brokers.values() if isinstance(b, dict) and b.get("state") == "UP"}
        for address in up:
            outage = self._outages.ended(address)
            if outage is not None:
                self.logger.info("Kafka broker %s reachable again after %.0f s (%d failures)",
                                 address, self._outages.seconds(outage), outage.total)

    def _connection_failed(self, address: str, text: str) -> None:
        due = self._outages.failed(address)
        if due is None:
            return
        what, outage = due
        if what == "started":
            self.logger.warning("Kafka broker %s unreachable: %s (further failures are counted, told once a "
                                "minute)", address, _reason(text))
        else:
            self.logger.warning("Kafka broker %s still unreachable after %.0f s: %d more failures in the last "
                                "%.0f s (%s)", address, self._outages.seconds(outage), outage.untold,
                                self._outages.seconds(outage, outage.told_at), _reason(text))

    # -- under the lock ------------------------------------------------------------------

    def _line(self, level: int, facility: str, client: str, text: str) -> None:
        now = self.clock()
        key = (level, _VARYING.sub("#", f"{facility} {text}"))
        repeat = self._repeats.get(key)
        if repeat is not None and now - repeat.told_at < self.interval:
            repeat.count += 1
            return
        if repeat is not None and repeat.count:
            self.logger.log(level, "%s [%s] %s (%d more like it in the last %.0f s)", facility, client, text,
                            repeat.count, now - repeat.told_at)
        else:
            self.logger.log(level, "%s [%s] %s", facility, client, text)
        self._repeats[key] = _Repeat(told_at=now)
        if len(self._repeats) > 1000:  # lines seen once long ago: nothing to count any more
            self._repeats = {k: r for k, r in self._repeats.items() if now - r.told_at < self.interval}


#: The thread a line comes from, which librdkafka puts first: "[thrd:127.0.0.1:9092/bootstrap]: ".
_THREAD = re.compile(r"^\[thrd:[^\]]*\]: ")


def _address(text: str) -> str | None:
    found = _ADDRESS.search(_THREAD.sub("", text))
    return None if found is None else f"{found.group(1)}:{found.group(2)}"


#: What a FAIL line starts with (the thread, the broker's names) and ends with (the time spent in a state).
_BROKER_NAMES = re.compile(r"^(?:\[thrd:[^\]]*\]: )?(?:(?:GroupCoordinator|\S+:\d+(?:/\S*)?): )+")
_TIMING = re.compile(r" \(after \d+ms in state \w+\)$")


def _reason(text: str) -> str:
    """A FAIL line without the broker names it starts with and the timing it ends with."""
    return _TIMING.sub("", _BROKER_NAMES.sub("", text))


#: The one every client of this process logs to (see :mod:`celery_redis_retry.kafka`).
LIBRDKAFKA_LOG = LibrdkafkaLog(logging.getLogger("celery_redis_retry.librdkafka"))
