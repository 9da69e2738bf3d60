"""Read ops in flight again from Kafka, to hand them over again.

Committing after end (``redis_retry_commit_after = "end"``) means Kafka keeps every op
until a worker reports it ended: the bridge need not keep a copy of each message in
memory while its op is in flight (about 440 bytes per op, 100,000 ops in flight by
default). When an op must be handed over again (it did not end within
``redis_retry_redelivery_timeout``, which is rare), :class:`Refetcher` reads it from its
partition with a consumer of its own that joins no group and commits nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from celery_redis_retry import kafka

logger = logging.getLogger(__name__)

#: Where an op was read: topic, partition, offset.
Position = tuple[str, int, int]

#: Its own small prefetch: it reads a few ops now and then, never a backlog.
_REFETCH_SETTINGS: Mapping[str, Any] = {
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "enable.partition.eof": True,
    "queued.max.messages.kbytes": 1024,
}


class Refetcher:
    """Reads messages at given positions (a client created on first use, closed with :meth:`close`)."""

    def __init__(self, user: Mapping[str, Any], group: str, overrides: Mapping[str, Any] | None = None) -> None:
        self._user = user
        self._group = f"{group}.refetch"
        self._overrides = {**dict(overrides or {}), **_REFETCH_SETTINGS}
        self._consumer: kafka.Consumer | None = None

    def _client(self) -> kafka.Consumer:
        if self._consumer is None:
            self._consumer = kafka.new_consumer(self._user, self._group, **self._overrides)
        return self._consumer

    def read(self, positions: Iterable[Position], timeout: float = 10.0) -> dict[Position, bytes]:
        """The message at each position still in Kafka, read within ``timeout`` seconds.

        A position missing from the answer was not read: gone from the partition
        (retention, a deleted topic) or not reached in time.
        """
        wanted: dict[tuple[str, int], set[int]] = {}
        for topic, partition, offset in positions:
            wanted.setdefault((topic, partition), set()).add(offset)
        if not wanted:
            return {}
        consumer = self._client()
        consumer.assign([kafka.TopicPartition(t, p, min(offsets)) for (t, p), offsets in wanted.items()])
        try:
            return self._collect(consumer, wanted, time.monotonic() + timeout)
        finally:
            consumer.unassign()  # no prefetch held between calls

    @staticmethod
    def _collect(consumer: kafka.Consumer, wanted: dict[tuple[str, int], set[int]],
                 deadline: float) -> dict[Position, bytes]:
        found: dict[Position, bytes] = {}
        last = {key: max(offsets) for key, offsets in wanted.items()}
        open_partitions = set(wanted)
        while open_partitions and time.monotonic() < deadline:
            for message in consumer.consume(500, 0.2):
                topic, partition = message.topic(), message.partition()
                if topic is None or partition is None:
                    continue
                key = (topic, partition)
                error = message.error()
                if error is not None:
                    if error.code() == kafka.KafkaError._PARTITION_EOF:
                        open_partitions.discard(key)
                    else:
                        logger.warning("reading ops again from %s[%d]: %s", topic, partition, error.str())
                    continue
                offset = message.offset()
                if offset is None or key not in wanted:
                    continue
                if offset in wanted[key]:
                    found[(topic, partition, offset)] = message.value() or b""
                if offset >= last[key]:
                    open_partitions.discard(key)
        return found

    def close(self) -> None:
        """Leave (nothing to commit)."""
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer.close()
