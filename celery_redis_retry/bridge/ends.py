"""Step 6 of the flow: workers tell the bridges which ops ended, so Kafka holds each op until then.

The bridge commits a partition's offset only up to its first op that has not ended
(``redis_retry_commit_after = "end"``, see :class:`~celery_redis_retry.bridge.offsets.OffsetTracker`):
whatever the Celery broker loses (a worker SIGKILLed between BRPOP and kombu's unacked
hash, a broker crash with ``appendfsync everysec``, ``celery purge``, ``FLUSHALL``), the op
is still in Kafka, and the bridge hands it over again once it has gone
``redis_retry_redelivery_timeout`` seconds without ending. The dedupe markers and the
write stamps make that second copy harmless.

The channel is one more Kafka topic, ``redis_retry_ends_topic`` (``<topic>.ends``): Kafka
is already there, durable and reachable from every worker, while the Celery broker is
what may lose things, and the target Redis may be down. Workers write *end records*,
one per task and source partition, never one per op::

    {"v": 1, "t": "<topic>", "p": 3, "e": [1200, 1201, 1207], "r": [[1202, 1767225600.5]]}

``e``: offsets that ended (applied, duplicate, superseded, expired, parked in a waiting
topic, or written to the DLQ and confirmed); ``r``: offsets scheduled again with a
countdown, each with the UNIX time it is due, so that a long backoff is not mistaken
for a lost task. ``o`` (optional; readers ignore it when absent) counts the outcomes of the
task that wrote the record (``{"applied": 40, "dead": 1}``), on one of its records only, so
that adding up every record's ``o`` counts each op once. The record's key is
``<topic>:<partition>``. Writes are not waited for: an end record lost with its worker
only means the op is handed over once more and ends ``duplicate``.

Every bridge reads every partition of the ends topic from where it stood when the
bridge started, without a consumer group, and keeps what concerns the partitions it
owns. What ended past a committed offset is kept in the commit's metadata too, so a
bridge restarted or newly assigned a partition hands over again only what had not
ended when the offset was last stored.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import msgspec

from celery_redis_retry import kafka
from celery_redis_retry.config import Settings

logger = logging.getLogger(__name__)

#: Where an op was handed over: topic, partition, offset.
Position = tuple[str, int, int]


class EndRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=False, omit_defaults=True):
    """What one end record says about one source partition."""

    v: int
    t: str
    p: int
    e: list[int] = msgspec.field(default_factory=list)
    r: list[tuple[int, float]] = msgspec.field(default_factory=list)
    #: Outcomes of the writing task's ops (None: not said; older workers write none).
    o: dict[str, int] | None = None


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(EndRecord).decode


def encode_records(
    ended: Iterable[Position],
    retrying: Iterable[tuple[Position, float]] = (),
    outcomes: Mapping[str, int] | None = None,
) -> list[EndRecord]:
    """End records for these positions, one per source partition; the first carries ``outcomes``."""
    by_partition: dict[tuple[str, int], EndRecord] = {}

    def record(topic: str, partition: int) -> EndRecord:
        found = by_partition.get((topic, partition))
        if found is None:
            found = by_partition[(topic, partition)] = EndRecord(1, topic, partition)
        return found

    for topic, partition, offset in ended:
        record(topic, partition).e.append(offset)
    for (topic, partition, offset), due in retrying:
        record(topic, partition).r.append((offset, round(due, 3)))
    records = list(by_partition.values())
    counted = {name: count for name, count in (outcomes or {}).items() if count}
    if records and counted:
        records[0] = msgspec.structs.replace(records[0], o=counted)
    return records


def decode_record(value: bytes | None) -> EndRecord | None:
    """The record in ``value``, or None for anything that is not a version-1 end record."""
    try:
        record = _decode(value or b"")
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return record if record.v == 1 else None


def position(value: Any) -> Position | None:
    """A position as the tasks receive it (``[topic, partition, offset]``), or None."""
    if isinstance(value, (list, tuple)) and len(value) == 3:
        topic, partition, offset = value
        if isinstance(topic, str) and isinstance(partition, int) and isinstance(offset, int):
            return topic, partition, offset
    return None


class EndsWriter:
    """A worker process's writer of end records (one producer, created on first use, per process)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._producer: kafka.Producer | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._failed = 0

    def _client(self) -> kafka.Producer:
        if self._producer is None or self._pid != os.getpid():
            self._pid = os.getpid()
            # Small and many: let librdkafka gather a few tasks' records into one request.
            self._producer = kafka.new_producer(self.settings.kafka, **{"linger.ms": 20, "message.timeout.ms": 30_000})
        return self._producer

    def report(
        self, ended: Iterable[Position | None], retrying: Iterable[tuple[Position | None, float]] = (),
        outcomes: Mapping[str, int] | None = None,
    ) -> None:
        """Tell the bridges these ops ended, and these are due again at the given UNIX times.

        ``outcomes`` (how many of the task's ops ended how) rides along for the operator page.

        Positions that are None (tasks sent by a bridge that commits at hand-over) are
        skipped. Never blocks and never raises: a lost record costs one more hand-over.
        """
        done = [p for p in ended if p is not None]
        later = [(p, due) for p, due in retrying if p is not None]
        if not done and not later:
            return
        try:
            with self._lock:
                producer = self._client()
                for record in encode_records(done, later, outcomes):
                    self._produce(producer, f"{record.t}:{record.p}".encode(), _encode(record))
                producer.poll(0)
        except Exception:  # never fail a replay for its report
            logger.warning("could not report %d ended ops to %s; the bridge will hand them over again",
                           len(done), self.settings.ends_topic, exc_info=True)

    def _produce(self, producer: kafka.Producer, key: bytes, value: bytes) -> None:
        def reported(err: kafka.KafkaError | None, _message: Any) -> None:
            if err is not None:
                self._failed += 1
                logger.warning("end record not written to %s (%s): those ops will be handed over again",
                               self.settings.ends_topic, err.str())

        for _ in range(50):
            try:
                producer.produce(self.settings.ends_topic, value, key, on_delivery=reported)
                return
            except BufferError:
                producer.poll(0.1)
        raise BufferError(f"librdkafka's queue stayed full: end record for {key.decode()} not written")

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (at worker process shutdown)."""
        producer, self._producer = self._producer, None
        if producer is not None and self._pid == os.getpid():
            try:
                left = producer.flush(timeout)
            except kafka.KafkaException as exc:
                # After a fatal error flush() raises: at shutdown that is a count to log,
                # not a traceback from the worker_process_shutdown handler.
                logger.debug("flushing end records at shutdown: %s", exc)
                left = len(producer)
            if left:
                logger.warning("%d end records not delivered at shutdown: those ops will be handed over again", left)


@dataclass
class Reported:
    """What the end records read in one call said: offsets ended, and offsets due again."""

    ended: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    retrying: dict[tuple[str, int], list[tuple[int, float]]] = field(default_factory=dict)
    records: int = 0
    #: The outcomes the records counted (records without ``o`` count none).
    outcomes: dict[str, int] = field(default_factory=dict)


class EndsReader:
    """A bridge's reader of every end record written since it started."""

    def __init__(self, settings: Settings, group: str, overrides: Mapping[str, Any] | None = None) -> None:
        self.settings = settings
        self.topic = settings.ends_topic
        self._consumer = kafka.new_consumer(
            settings.kafka, f"{group}.ends",
            **{**dict(overrides or {}), "enable.auto.commit": False, "enable.auto.offset.store": False},
        )
        self._partitions: list[int] = []
        self._next_refresh = time.monotonic() + 30.0
        self._lookups = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crr-ends-lookup")
        self._group, self._overrides = group, dict(overrides or {})
        self._lookup_client: kafka.Consumer | None = None
        self._lookup: Future[list[int]] | None = None
        self.unreadable = 0

    def start(self) -> None:
        """Start at the current end of every partition: nothing this bridge hands over can end before it."""
        kafka.require_topic(self._consumer, self.topic, self.settings.kafka, role="ends")
        self._assign(kafka.topic_partitions(self._consumer, self.topic, timeout=10.0), at_end=True)

    def _refresh(self) -> None:
        """Take in partitions added to the topic since (read from their start), every 30 s.

        The metadata request runs in a thread, on a client of its own: it can take
        hundreds of milliseconds, and the bridge's loop, which calls this, must not wait
        for it (it held every op of the loop for about 0.4 s every 30 s).
        """
        lookup = self._lookup
        if lookup is not None:
            if not lookup.done():
                return
            self._lookup = None
            try:
                self._assign(lookup.result(), at_end=False)
            except kafka.KafkaException as exc:
                logger.debug("looking for new partitions of %s failed (%s): again in 30 s", self.topic, exc)
            return
        now = time.monotonic()
        if now >= self._next_refresh:
            self._next_refresh = now + 30.0
            self._lookup = self._lookups.submit(self._look_up)

    def _look_up(self) -> list[int]:
        # A client of its own: a metadata request on the reading consumer holds its
        # consume() calls (measured: about 0.4 s on the development broker).
        if self._lookup_client is None:
            self._lookup_client = kafka.new_consumer(self.settings.kafka, f"{self._group}.ends",
                                                     **{**self._overrides, "enable.auto.commit": False})
        return kafka.topic_partitions(self._lookup_client, self.topic, timeout=2.0)

    def _assign(self, numbers: Iterable[int], *, at_end: bool) -> None:
        added = [p for p in numbers if p not in self._partitions]
        if not added:
            return
        starts = []
        for number in added:
            partition = kafka.TopicPartition(self.topic, number)
            if at_end:
                _, high = self._consumer.get_watermark_offsets(partition, timeout=10.0)
                partition.offset = high
            else:
                partition.offset = kafka.OFFSET_BEGINNING
            starts.append(partition)
        self._consumer.incremental_assign(starts)
        self._partitions += added

    def read(self, count: int = 2000) -> Reported:
        """What the end records waiting to be read say (without blocking)."""
        self._refresh()
        out = Reported()
        for message in self._consumer.consume(count, 0):
            error = message.error()
            if error is not None:
                if error.code() != kafka.KafkaError._PARTITION_EOF:
                    logger.warning("reading %s: %s", self.topic, error.str())
                continue
            record = decode_record(message.value())
            if record is None:
                self.unreadable += 1
                continue
            out.records += 1
            key = (record.t, record.p)
            if record.e:
                out.ended.setdefault(key, []).extend(record.e)
            if record.r:
                out.retrying.setdefault(key, []).extend(record.r)
            for outcome, ops in (record.o or {}).items():
                out.outcomes[outcome] = out.outcomes.get(outcome, 0) + ops
        return out

    def close(self) -> None:
        """Leave (nothing to commit: every bridge reads from where it started)."""
        self._lookups.shutdown(wait=True)  # a lookup under way: at most 2 s
        if self._lookup_client is not None:
            self._lookup_client.close()
        self._consumer.close()
