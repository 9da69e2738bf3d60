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
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
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
        return {"ref": self.ref, "state": self.state, **body}

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

    def republish(self, records: Iterable[StoredLetter]) -> RepublishResult:
        """Publish the ops of ``records`` to ``redis_retry_topic`` and wait for Kafka to confirm.

        This is what ``dlq replay`` does: the bridge then hands each op to the replay
        tasks, which run it on Redis.

        Records without an op (undecodable messages), ``rejected`` ones (they were never
        valid) and ops these settings refuse (an unknown target, a script no longer
        registered...) are refused and stay pending.
        :class:`~celery_redis_retry.kafka.TopicMissingError` before anything is published
        if the retry topic does not exist (librdkafka would hold every op for 30 s, then
        fail them all).
        """
        republished: list[tuple[StoredLetter, str]] = []
        batch, refused = self.check(records)
        if batch:
            producer = kafka.new_producer(self.settings.kafka, **{"linger.ms": 5})
            kafka.require_topic(producer, self.settings.topic, self.settings.kafka, role="retry",
                                timeout=self.timeout)
            errors = kafka.produce_confirmed(
                producer, self.settings.topic, [(message_key(op), raw, None) for _s, op, raw in batch]
            )
            for (stored, op, _raw), error in zip(batch, errors, strict=True):
                if error is None:
                    republished.append((stored, op.id))
                else:
                    refused.append((stored, f"Kafka did not take it: {error}"))
        for stored, new_id in republished:
            logger.info("DLQ record %s (op %s) republished as op %s", stored.ref, stored.op_id, new_id)
        return RepublishResult(republished, refused)

    def replay(self, records: Sequence[StoredLetter], chosen: Iterable[StoredLetter]) -> tuple[RepublishResult, int]:
        """``dlq replay``: :meth:`republish` ``chosen``, then :meth:`advance` over those republished.

        ``records`` is what :meth:`read` returned. Returns the result and how many records stay pending.
        """
        result = self.republish(chosen)
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
class Cursor:
    """Where the operator stands in one DLQ partition."""

    offset: int  # the first record not dealt with
    beyond: frozenset[int]  # records past it that were dealt with

    def handled(self, offset: int) -> bool:
        return offset < self.offset or offset in self.beyond


def select(
    records: Sequence[StoredLetter],
    *,
    refs: Sequence[str] = (),
    reason: str | None = None,
    outcome: str | None = None,
) -> tuple[list[StoredLetter], list[str]]:
    """The records named by ``refs`` (all if none) that match ``reason`` and ``outcome``.

    Also returns the refs that named no record, so a command can say so.
    """
    unknown = [ref for ref in refs if not any(s.matches(ref) for s in records)]
    chosen = [
        s for s in records
        if (not refs or any(s.matches(ref) for ref in refs))
        and (reason is None or (s.letter is not None and s.letter.reason == reason))
        and (outcome is None or (s.letter is not None and s.letter.outcome == outcome))
    ]
    return chosen, unknown


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
