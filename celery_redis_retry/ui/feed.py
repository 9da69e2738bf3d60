"""The operator page's figures: a thread that reads them every few seconds and keeps their trend.

Each round reads :func:`celery_redis_retry.cli.status.collect` (lag per partition, Celery
queue, retries the workers hold, DLQ pending, spool, each target's circuit) and the end
records written since the page started (ops ended per second, and their outcomes when the
records carry them). The last ten minutes of samples are kept for the page's sparklines.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from typing import Any

from celery_redis_retry.bridge.ends import EndsReader
from celery_redis_retry.cli.status import collect
from celery_redis_retry.config import Settings

logger = logging.getLogger(__name__)

#: How long the trend goes back, in seconds.
TREND_SECONDS = 600.0


class Feed:
    """Reads the figures every ``interval`` seconds in a daemon thread; :meth:`snapshot` gives the latest."""

    def __init__(self, app: Any, settings: Settings, *, interval: float = 1.5, timeout: float = 5.0) -> None:
        self.app = app
        self.settings = settings
        self.interval = interval
        self.timeout = timeout
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._samples: deque[dict[str, Any]] = deque()
        self._latest: dict[str, Any] = {"status": None, "error": "no figures yet"}
        self._ended_total = 0
        self._outcomes: Counter[str] = Counter()
        self._ends: EndsReader | None = None
        self._last_read = time.monotonic()

    def start(self) -> None:
        """Start reading (the ends topic from its current end)."""
        self._thread = threading.Thread(target=self._run, name="crr-ui-feed", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and close its Kafka clients."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout + 5)
        if self._ends is not None:
            self._ends.close()

    def snapshot(self) -> dict[str, Any]:
        """The latest figures, with the trend of lag, ops ended and applied per second."""
        with self._lock:
            return {**self._latest, "trend": list(self._samples)}

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._round()
            except Exception as exc:  # noqa: BLE001 - shown on the page; the next round tries again
                logger.warning("reading the figures failed: %s", exc)
                with self._lock:
                    self._latest = {**self._latest, "error": f"{type(exc).__name__}: {exc}"}
            self._stop.wait(max(0.1, self.interval - (time.monotonic() - started)))

    def _round(self) -> None:
        applied_before = self._outcomes["applied"]
        ended, since = self._read_ends()
        applied = self._outcomes["applied"] - applied_before
        status = collect(self.app, self.settings, timeout=self.timeout)
        now = time.time()
        sample = {"t": now, "lag": status.lag,
                  "ended_per_s": None if since is None else ended / since,
                  "applied_per_s": None if since is None else applied / since}
        with self._lock:
            self._samples.append(sample)
            while self._samples and self._samples[0]["t"] < now - TREND_SECONDS:
                self._samples.popleft()
            self._latest = {
                "status": status.document(),
                "error": None,
                "at": now,
                "ended_total": self._ended_total,
                "ended_per_s": sample["ended_per_s"],
                "applied_per_s": sample["applied_per_s"],
                "outcomes": dict(self._outcomes),
            }

    def _read_ends(self) -> tuple[int, float | None]:
        """Ops ended since the last call, and the seconds since (None at the first call)."""
        if self._ends is None:
            reader = EndsReader(self.settings, f"{self.settings.consumer_group}.ui")
            try:
                reader.start()
            except Exception:
                reader.close()  # the next round tries again (the ends topic may not exist yet)
                raise
            self._ends, self._last_read = reader, time.monotonic()
            return 0, None
        ended = 0
        while True:
            reported = self._ends.read()
            ended += sum(len(offsets) for offsets in reported.ended.values())
            for outcome, count in reported.outcomes.items():
                self._outcomes[outcome] += count
            if reported.records < 2000:
                break
        now = time.monotonic()
        since, self._last_read = now - self._last_read, now
        self._ended_total += ended
        return ended, since
