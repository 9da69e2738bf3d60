"""Operator tools for the dead-letter topic: list, show, republish and purge.

``celery -A app redis-retry dlq replay`` *republishes*: it publishes a record's op to
``redis_retry_topic`` again, where the bridge hands it to the replay tasks like any other
op. In this module "republish" names that step, so it is not confused with replaying an
op on Redis (:mod:`celery_redis_retry.replay`).

Kafka records are never deleted by these tools. What an operator has dealt with
(republished or purged) is tracked in a consumer group of its own,
``<redis_retry_consumer_group>.dlq``: per partition, its committed offset (the *cursor*)
is the first record not dealt with, and the commit's metadata lists the records dealt
with beyond it (``"12,15-20"``), since an operator may republish one record and leave older
ones. Every other record is *pending*. Nothing joins that group, so nothing else moves
it, and any Kafka broker keeps it.

A republished op has its attempts reset and an id derived from the DLQ record it came
from (``<op id>.dlq-<partition>-<offset>``): it is a new life for the op, not a duplicate
of the one that died (whose dedupe marker may exist), yet republishing the same record
twice applies it once, since both copies carry the same id.

A replay is crash-safe ("copy, confirm, then mark handled"): :meth:`DeadLetterQueue.republish`
publishes in chunks (every :data:`CHUNK_RECORDS` records or :data:`CHUNK_SECONDS`), waits
for Kafka to confirm a chunk, and only then marks its records handled
(:meth:`DeadLetterQueue.advance`). A replay killed half-way therefore

* loses no record: one whose copy Kafka had not confirmed was not marked, and is still
  pending for the next run;
* applies none twice: a record whose copy was confirmed but not yet marked is published
  again by the next run, with the same derived id, and the replay tasks' dedupe marker
  for that id lets only one of the two copies write.

The derived id also says where an op was replayed from: a record whose op id ends in
``.dlq-<partition>-<offset>`` is the death of a replay (:attr:`StoredLetter.replayed_from`),
and it survives any number of round trips (each replay adds its own suffix). Such a
record is replayed only when an operator chooses it, never by ``--all`` alone.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from celery_redis_retry import kafka
from celery_redis_retry.config import Settings
from celery_redis_retry.dlq.record import DeadLetter, decode_record
from celery_redis_retry.errors import DecodeError, EncodeError, RedisRetryError
from celery_redis_retry.message import encode, message_key
from celery_redis_retry.ops import RedisOp

logger = logging.getLogger(__name__)

#: A chunk of a replay: Kafka confirms it, then its records are marked handled.
CHUNK_RECORDS = 100
CHUNK_SECONDS = 1.0

#: The suffix :func:`republished_copy` gives an op id: ``.dlq-<partition>-<offset>``.
_REPLAY_SUFFIX = re.compile(r"\.dlq-(\d+)-(\d+)$")
_ANY_REPLAY_SUFFIX = re.compile(r"\.dlq-\d+-\d+")


@dataclass(frozen=True)
class StoredLetter:
    """One record of the DLQ topic, decoded (``letter``) or not (``problem`` says why)."""

    partition: int
    offset: int
    timestamp_ms: int
    letter: DeadLetter | None
    problem: str | None = None
    #: Republished (``dlq replay``) or purged already.
    handled: bool = False

    @property
    def ref(self) -> str:
        """``PARTITION:OFFSET``, how commands name a record."""
        return f"{self.partition}:{self.offset}"

    @property
    def op_id(self) -> str:
        """The id of the op the record holds, ``-`` when it holds none."""
        return (self.letter.op_id if self.letter is not None else None) or "-"

    @property
    def state(self) -> str:
        """``handled`` (republished or purged already) or ``pending``."""
        return "handled" if self.handled else "pending"

    def document(self) -> dict[str, Any]:
        """The record as JSON-ready data, with its ref and state (``problem`` says why an undecodable one is)."""
        body = self.letter.document() if self.letter is not None else {"problem": self.problem}
        return {"ref": self.ref, "state": self.state, "replayed_from": self.replayed_from, **body}

    @property
    def replayed_from(self) -> str | None:
        """``PARTITION:OFFSET`` of the DLQ record this op was last replayed from, or None (a first death)."""
        found = _REPLAY_SUFFIX.search(self.op_id)
        return f"{found[1]}:{found[2]}" if found else None

    @property
    def replays(self) -> int:
        """How many times this record's op was replayed from the DLQ before it died here."""
        return len(_ANY_REPLAY_SUFFIX.findall(self.op_id))

    def matches(self, ref: str) -> bool:
        """Whether ``ref`` names this record: ``PARTITION:OFFSET`` or its op id."""
        return ref == self.ref or (self.letter is not None and ref == self.letter.op_id)


@dataclass(frozen=True)
class RepublishResult:
    """What :meth:`DeadLetterQueue.republish` did with each record it was given."""

    republished: list[tuple[StoredLetter, str]]  # record, id of the op published
    refused: list[tuple[StoredLetter, str]]  # record, why it cannot be republished


def republished_copy(stored: StoredLetter, op: RedisOp) -> RedisOp:
    """The op to publish again for a DLQ record: attempts reset, id derived from the record."""
    return msgspec.structs.replace(op, id=f"{op.id}.dlq-{stored.partition}-{stored.offset}", attempt=0)


class DeadLetterQueue:
    """The DLQ topic seen by an operator: records, the cursor, republish and purge."""

    def __init__(self, settings: Settings, *, timeout: float = 30.0) -> None:
        self.settings = settings
        self.topic = settings.dlq_topic
        self.cursor_group = f"{settings.consumer_group}.dlq"
        self.timeout = timeout

    # -- reading -------------------------------------------------------------------------

    def cursor(self) -> dict[int, Cursor]:
        """Per partition: the first record not dealt with, and those dealt with beyond it."""
        offsets = self._offsets()
        return {p: Cursor(max(o.committed, o.low), kafka.parse_offsets(o.metadata)) for p, o in offsets.items()}

    def pending_count(self) -> int:
        """How many records are pending, from the watermarks (without reading them)."""
        offsets = self._offsets()
        return sum(o.pending for o in offsets.values())

    def _offsets(self) -> dict[int, kafka.PartitionOffsets]:
        # A DLQ topic that does not exist is an error (TopicMissingError), not an empty DLQ:
        # on a cluster that does not create topics on use, no dead letter could be kept.
        try:
            return kafka.group_offsets(
                self.settings.kafka, self.topic, self.cursor_group, timeout=self.timeout, must_exist=True
            )
        except kafka.TopicMissingError as exc:
            exc.role = "DLQ"
            raise

    def read(self, *, include_handled: bool = False) -> list[StoredLetter]:
        """The records from the cursor on (from the beginning with ``include_handled``).

        Oldest first in each partition, each marked ``handled`` or not.
        :class:`~celery_redis_retry.kafka.TopicMissingError` if the DLQ topic does not exist.
        """
        cursor = self.cursor()
        start = None if include_handled else {p: c.offset for p, c in cursor.items()}
        messages = kafka.read_to_end(self.settings.kafka, self.topic, start, timeout=self.timeout)
        records = [_stored(m, cursor.get(m.partition() or 0)) for m in messages]
        return sorted(records, key=lambda s: (s.partition, s.offset))

    # -- acting --------------------------------------------------------------------------

    def republish(
        self,
        records: Iterable[StoredLetter],
        *,
        mark_in: Sequence[StoredLetter] | None = None,
        rate: float | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> RepublishResult:
        """Publish the ops of ``records`` to ``redis_retry_topic``, waiting for Kafka to confirm them.

        This is what ``dlq replay`` does: the bridge then hands each op to the replay
        tasks, which run it on Redis. Ops go out in chunks (see the module documentation);
        with ``mark_in`` (what :meth:`read` returned), each chunk Kafka confirmed is marked
        handled before the next one is published. ``rate`` paces the publishing (ops per
        second; None: as fast as Kafka takes them); ``progress`` is called with the number
        of records done after each one.

        Records without an op (undecodable messages), ``rejected`` ones (they were never
        valid) and ops these settings refuse (an unknown target, a script no longer
        registered...) are refused and stay pending.
        :class:`~celery_redis_retry.kafka.TopicMissingError` before anything is published
        if the retry topic does not exist (librdkafka would hold every op for 30 s, then
        fail them all).
        """
        if rate is not None and rate <= 0:
            raise ValueError(f"a replay rate must be above 0 ops per second, got {rate}")
        republished: list[tuple[StoredLetter, str]] = []
        batch, refused = self.check(records)
        if batch:
            producer = kafka.new_producer(self.settings.kafka, **{"linger.ms": 5})
            kafka.require_topic(producer, self.settings.topic, self.settings.kafka, role="retry",
                                timeout=self.timeout)
            chunk: list[_Sent] = []
            started = chunk_started = time.monotonic()
            for index, (stored, op, raw) in enumerate(batch):
                if rate is not None:
                    _sleep_until(started + index / rate)
                chunk.append(self._send(producer, stored, op, raw))
                if len(chunk) >= CHUNK_RECORDS or time.monotonic() - chunk_started >= CHUNK_SECONDS:
                    self._settle(producer, chunk, republished, refused, mark_in)
                    chunk, chunk_started = [], time.monotonic()
                if progress is not None:
                    progress(index + 1)
            self._settle(producer, chunk, republished, refused, mark_in)
        return RepublishResult(republished, refused)

    def _send(self, producer: kafka.Producer, stored: StoredLetter, op: RedisOp, raw: bytes) -> _Sent:
        sent = _Sent(stored, op.id, [])
        kafka.produce_reported(producer, self.settings.topic, [(message_key(op), raw, None)], sent.report.extend)
        producer.poll(0)
        return sent

    def _settle(
        self,
        producer: kafka.Producer,
        chunk: list[_Sent],
        republished: list[tuple[StoredLetter, str]],
        refused: list[tuple[StoredLetter, str]],
        mark_in: Sequence[StoredLetter] | None,
    ) -> None:
        """Wait for Kafka's word on every op of ``chunk``, then mark what it confirmed (copy, confirm, mark)."""
        # Bounded: librdkafka reports every message within message.timeout.ms.
        while not all(sent.report for sent in chunk):
            producer.poll(0.5)
        for sent in chunk:
            error = sent.report[0]
            if error is None:
                republished.append((sent.stored, sent.new_id))
                logger.info("DLQ record %s (op %s) republished as op %s", sent.stored.ref, sent.stored.op_id,
                            sent.new_id)
            else:
                refused.append((sent.stored, f"Kafka did not take it: {error}"))
        if mark_in is not None and chunk:
            self.advance(mark_in, [stored for stored, _ in republished])

    def replay(
        self,
        records: Sequence[StoredLetter],
        chosen: Iterable[StoredLetter],
        *,
        rate: float | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[RepublishResult, int]:
        """``dlq replay``: :meth:`republish` ``chosen``, marking each chunk handled once Kafka
        confirmed it; return the result and how many of ``records`` (what :meth:`read`
        returned) stay pending."""
        result = self.republish(chosen, mark_in=records, rate=rate, progress=progress)
        return result, self.advance(records, [s for s, _ in result.republished])

    def check(
        self, records: Iterable[StoredLetter]
    ) -> tuple[list[tuple[StoredLetter, RedisOp, bytes]], list[tuple[StoredLetter, str]]]:
        """Split ``records`` into those :meth:`republish` would publish (with the op and its
        encoding) and those it would refuse (with why), without publishing anything."""
        ready: list[tuple[StoredLetter, RedisOp, bytes]] = []
        refused: list[tuple[StoredLetter, str]] = []
        for stored in records:
            try:
                op = self._republishable(stored)
                ready.append((stored, op, encode(op, self.settings.signer)))
            except RedisRetryError as exc:
                refused.append((stored, str(exc)))
        return ready, refused

    def _republishable(self, stored: StoredLetter) -> RedisOp:
        letter = stored.letter
        if letter is None:
            raise DecodeError(f"record {stored.ref} is not a DLQ record: {stored.problem}")
        if letter.outcome == "rejected":
            raise EncodeError(f"record {stored.ref} was rejected ({letter.reason}): it can never be republished")
        if letter.op is None:
            raise DecodeError(f"record {stored.ref} holds no op")
        op = republished_copy(stored, letter.op)
        self.settings.check_op(op)
        return op

    def advance(self, records: Sequence[StoredLetter], dealt_with: Iterable[StoredLetter]) -> int:
        """Record ``dealt_with`` as handled; return how many of ``records`` stay pending.

        ``records`` is what :meth:`read` returned. In each partition the cursor moves
        over every handled record up to the first pending one; handled records beyond it
        go to the commit's metadata.
        """
        done = {(s.partition, s.offset) for s in dealt_with}
        by_partition: dict[int, list[StoredLetter]] = {}
        for stored in records:
            by_partition.setdefault(stored.partition, []).append(stored)
        commits: dict[int, tuple[int, set[int]]] = {}
        pending = 0
        for partition, stored_list in by_partition.items():
            handled = [s.handled or (partition, s.offset) in done for s in stored_list]
            pending += handled.count(False)
            if not any((partition, s.offset) in done for s in stored_list):
                continue  # nothing new here: leave its commit as it is
            first_pending = next((s for s, h in zip(stored_list, handled, strict=True) if not h), None)
            offset = first_pending.offset if first_pending is not None else stored_list[-1].offset + 1
            beyond = {s.offset for s, h in zip(stored_list, handled, strict=True) if h and s.offset > offset}
            commits[partition] = (offset, beyond)
        if commits:
            self._commit(commits)
        return pending

    def _commit(self, commits: dict[int, tuple[int, set[int]]]) -> None:
        consumer = kafka.new_consumer(self.settings.kafka, self.cursor_group, **{"enable.auto.commit": False})
        try:
            consumer.commit(
                offsets=[
                    kafka.TopicPartition(self.topic, p, offset, metadata=kafka.format_offsets(beyond))
                    for p, (offset, beyond) in sorted(commits.items())
                ],
                asynchronous=False,
            )
        finally:
            consumer.close()


@dataclass(frozen=True)
class _Sent:
    """An op of a replay chunk, published; ``report`` gets Kafka's word (None: confirmed, else the error)."""

    stored: StoredLetter
    new_id: str
    report: list[str | None]


def _sleep_until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        time.sleep(delay)


@dataclass(frozen=True)
class Cursor:
    """Where the operator stands in one DLQ partition."""

    offset: int  # the first record not dealt with
    beyond: frozenset[int]  # records past it that were dealt with

    def handled(self, offset: int) -> bool:
        return offset < self.offset or offset in self.beyond


def describe_op(op: RedisOp | None, width: int = 60) -> str:
    """A one-line summary of an op for listings: ``SET user:1 …``, ``pipeline(3): …``."""
    if op is None:
        return "-"
    if op.kind == "script":
        text = f"script {op.script} keys={[_text(k) for k in op.keys]}"
    else:
        first = op.commands[0]
        text = " ".join(_text(a) for a in first[:2])
        if op.kind == "pipeline":
            text = f"{'multi' if op.transaction else 'pipeline'}({len(op.commands)}): {text} …"
    return text if len(text) <= width else text[: width - 1] + "…"


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def _stored(message: kafka.Message, cursor: Cursor | None) -> StoredLetter:
    partition, offset = message.partition() or 0, message.offset() or 0
    timestamp = message.timestamp()[1]
    handled = cursor is not None and cursor.handled(offset)
    try:
        return StoredLetter(partition, offset, timestamp, decode_record(message.value() or b""), handled=handled)
    except DecodeError as exc:
        return StoredLetter(partition, offset, timestamp, None, problem=str(exc), handled=handled)
