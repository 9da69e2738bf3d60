"""Where ops wait while their target is down: one Kafka topic per target.

The retry topic's partitions mix targets (the message key is target + first Redis
key), so holding one target's ops in place would hold every target behind them. An op
whose target's circuit is open is therefore *parked*: written, confirmed, to
``<redis_retry_topic>.waiting.<target>``, and only then is its offset in the retry
topic stored. Ops of healthy targets never wait behind it.

A waiting topic holds one target's ops only, so it can simply stop: the bridge reads
it while that target's circuit is closed or recovering, and pauses it (storing no
offset past the first op not handed over) while the circuit is open. Parking keeps the
op's wire bytes as they were (and its signature), except that a worker parking an op
that already failed on its own records the attempts spent in the op's ``attempt``
field, re-signed with the settings' signing key.

Headers say why and from where: ``crr-parked-by`` (bridge | worker), ``crr-parked-reason``,
``crr-not-before`` (UNIX time before which it is not handed over again: a worker that
met the outage first gives the bridges a moment to see it too), and the op's first
``crr-origin-topic``/``-partition``/``-offset`` in the retry topic.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from celery_redis_retry import kafka
from celery_redis_retry.config import Settings
from celery_redis_retry.errors import PublishError
from celery_redis_retry.message import encode, message_key
from celery_redis_retry.ops import RedisOp

logger = logging.getLogger(__name__)

#: A worker that parked an op asks the bridges not to hand it over for this long.
WORKER_PARK_HOLD = 1.0


@dataclass(frozen=True)
class Parked:
    """One op to park: its wire bytes (as read), the op, and where it first came from."""

    message: bytes
    op: RedisOp
    origin: tuple[str, int, int] | None = None
    attempts: int = 0  # attempts spent on failures of the op itself


@dataclass(frozen=True)
class ParkedHeaders:
    """What the headers of a message read from a waiting topic say."""

    not_before: float = 0.0
    origin: tuple[str, int, int] | None = None

    @classmethod
    def read(cls, headers: Any) -> ParkedHeaders:
        """Parse the ``crr-*`` headers of a parked message (as ``Message.headers()`` gives them)."""
        pairs = headers.items() if isinstance(headers, dict) else headers or ()
        values = {k: v.decode(errors="replace") if isinstance(v, bytes) else str(v) for k, v in pairs if v is not None}
        try:
            not_before = float(values.get("crr-not-before", 0) or 0)
        except ValueError:
            not_before = 0.0
        origin = None
        try:
            if "crr-origin-topic" in values:
                origin = (values["crr-origin-topic"], int(values["crr-origin-partition"]),
                          int(values["crr-origin-offset"]))
        except (KeyError, ValueError):
            origin = None
        return cls(not_before, origin)


class WaitingWriter:
    """Parks ops in their target's waiting topic, each write confirmed by the broker."""

    def __init__(self, settings: Settings, *, parked_by: str) -> None:
        self.settings = settings
        self.parked_by = parked_by
        self._producer: kafka.Producer | None = None
        self._lock = threading.Lock()

    def _client(self) -> kafka.Producer:
        if self._producer is None:
            self._producer = kafka.new_producer(
                self.settings.kafka, **{"linger.ms": 2, "message.timeout.ms": 10_000}
            )
        return self._producer

    def park(self, target: str, items: Sequence[Parked], reason: str, *, hold: float = 0.0) -> None:
        """Write ``items`` to ``target``'s waiting topic; :class:`PublishError` unless all were confirmed."""
        if not items:
            return
        topic = self.settings.waiting_topic(target)
        with self._lock:
            errors = kafka.produce_confirmed(self._client(), topic, self._records(items, reason, hold))
        failed = [e for e in errors if e is not None]
        if failed:
            raise PublishError(f"{len(failed)} of {len(items)} ops not confirmed by {topic}: {failed[0]}")

    def park_async(
        self, target: str, items: Sequence[Parked], reason: str, on_reports: Callable[[list[str | None]], None],
        *, hold: float = 0.0,
    ) -> None:
        """Write ``items`` without waiting; ``on_reports`` gets one error or None per item from :meth:`poll`."""
        records = self._records(items, reason, hold)
        kafka.produce_reported(self._client(), self.settings.waiting_topic(target), records, on_reports)

    def _records(self, items: Sequence[Parked], reason: str, hold: float) -> list[kafka.Record]:
        not_before = f"{time.time() + hold:.3f}" if hold else None
        records: list[kafka.Record] = []
        for item in items:
            headers: list[tuple[str, str | bytes | None]] = [
                ("crr-parked-by", self.parked_by.encode()),
                ("crr-parked-reason", reason[:512].encode(errors="replace")),
            ]
            if not_before is not None:
                headers.append(("crr-not-before", not_before.encode()))
            if item.origin is not None:
                headers += [("crr-origin-topic", item.origin[0].encode()),
                            ("crr-origin-partition", str(item.origin[1]).encode()),
                            ("crr-origin-offset", str(item.origin[2]).encode())]
            records.append((message_key(item.op), self._wire(item), headers))
        return records

    def poll(self, timeout: float = 0.0) -> None:
        """Serve delivery reports of :meth:`park_async` writes."""
        if self._producer is not None:
            self._producer.poll(timeout)

    def flush(self, timeout: float = 10.0) -> None:
        """Wait for every write in flight to be reported."""
        if self._producer is not None:
            self._producer.flush(timeout)

    def _wire(self, item: Parked) -> bytes:
        if item.attempts == item.op.attempt:
            return item.message
        return encode(msgspec.structs.replace(item.op, attempt=item.attempts), self.settings.signer)

    def close(self, timeout: float = 10.0) -> None:
        """Flush and drop the producer."""
        if self._producer is not None:
            self._producer.flush(timeout)
            self._producer = None
