"""The one branch of the flow: ops that cannot be applied go to the dead-letter topic.

A DLQ record is one JSON object holding the op (decoded, as in wire format v1) or, for a
message that could not be decoded, its raw bytes in base64, plus why and when it died::

    {"v": 1, "outcome": "dead" | "rejected", "reason": "retries_exhausted",
     "op": {...} | null, "raw": "<base64>" | null,
     "raw_size": 812345, "raw_sha256": "<hex>",    (with "raw" only)
     "error": {"type": ..., "message": ..., "traceback": ...},
     "attempts": 4, "first_failure_at": ..., "last_failure_at": ..., "task_id": ...,
     "origin": {"topic": ..., "partition": ..., "offset": ...}}

The key fields are repeated as Kafka headers (``crr-outcome``, ``crr-reason``,
``crr-op-id``, ``crr-error-type``, ``crr-attempts``, ``crr-task-id``,
``crr-origin-topic``, ``crr-origin-partition``, ``crr-origin-offset``) so that tools can
filter without parsing. Writes are confirmed by the broker, retried, and logged loudly
when they fail: a dead letter is never dropped in silence.

A record always fits in a Kafka message: ``raw`` keeps at most :data:`MAX_RAW_BYTES` of
an invalid message (an 800 KB or 5 MB one would not fit once base64-encoded, and its
DLQ write would fail for ever, stalling its partition), with the whole message's size
and SHA-256 digest; ``origin`` says where the original is, while the ops topic keeps it.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import msgspec

from celery_redis_retry import kafka
from celery_redis_retry.config import Settings
from celery_redis_retry.errors import DecodeError, PublishError, RedisRetryError
from celery_redis_retry.message import Reader, decode, dumps, encode, message_key, op_document
from celery_redis_retry.ops import RedisOp

logger = logging.getLogger(__name__)

#: Tracebacks are cut to this many characters (the end is kept: it names the error).
MAX_TRACEBACK = 8192

#: Most bytes of an invalid message a DLQ record keeps (base64: 4/3 of that), far below
#: Kafka's default message size limit (1 MB) whatever the message was.
MAX_RAW_BYTES = 64 * 1024

#: Largest DLQ record written whole. A dead op close to ``redis_retry_max_message_bytes``
#: plus its error and traceback may not fit Kafka's default limit (librdkafka's
#: ``message.max.bytes``, 1,000,000): such a record keeps the op's encoding the way
#: ``raw`` is kept (its start, size and digest) and names the op by ``op_id``.
MAX_RECORD_BYTES = 900_000


#: Every ``reason`` a DLQ record of this release can carry: the ``reason`` of the errors
#: that end an op (:mod:`.errors`), Redis's permanent errors
#: (:func:`.policy.permanent_reason`), ``too_large`` (a command with too many arguments
#: to apply atomically), and a task's time limit or an error this package does not know
#: (:func:`_describe`). The operator commands accept no other for ``--reason``; a test
#: keeps the list complete.
REASONS: frozenset[str] = frozenset({
    # rejected: the message was never a valid op
    "malformed", "unsupported_version", "bad_signature", "forbidden_command", "unknown_target", "unknown_script",
    # dead: the op could not be applied
    "configuration", "invalid_op", "cross_slot", "replay_failed", "retries_exhausted", "permanent_error",
    "wrong_type", "unknown_command", "syntax_error", "invalid_value", "too_large", "time_limit", "unexpected_error",
})


class Origin(NamedTuple):
    """Where an op was first read from Kafka: its topic, partition and offset.

    A tuple, so it serves wherever a position ``(topic, partition, offset)`` is taken.
    Two forms travel: :meth:`to_wire`, the list in ``replay_batch`` arguments, and
    :meth:`to_document`, the object in DLQ records and in the ``origin`` argument of
    ``replay`` (what workers of earlier releases read there); :meth:`from_wire` reads both.
    """

    topic: str
    partition: int
    offset: int

    @classmethod
    def from_wire(cls, value: Any) -> Origin | None:
        """The origin in a task argument or a DLQ record: ``[topic, partition, offset]``, the object form, or None."""
        if value is None:
            return None
        if isinstance(value, dict):
            value = (value.get("topic"), value.get("partition"), value.get("offset"))
        if isinstance(value, (list, tuple)) and len(value) == 3:
            topic, partition, offset = value
            if isinstance(topic, str) and type(partition) is int and type(offset) is int:
                return cls(topic, partition, offset)
        raise ValueError(
            f"an op's origin must be [topic, partition, offset] or {{'topic', 'partition', 'offset'}}, got {value!r}"
        )

    def to_wire(self) -> list[str | int]:
        """The list form, as ``replay_batch`` receives its ops' origins."""
        return [self.topic, self.partition, self.offset]

    def to_document(self) -> dict[str, str | int]:
        """The object form, as DLQ records hold it and ``replay`` receives it."""
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset}


@dataclass(frozen=True)
class DeadLetter:
    """One dead or rejected op, with why and when."""

    outcome: str  # "dead" | "rejected"
    reason: str
    op: RedisOp | None = None
    raw: bytes | None = None  # the message as received, when it could not be decoded (its start, when read back)
    #: The length and SHA-256 (hex) of the whole message ``raw`` came from; set when read back.
    raw_size: int | None = None
    raw_sha256: str | None = None
    error_type: str = ""
    error_message: str = ""
    traceback: str = ""
    attempts: int = 0
    first_failure_at: float | None = None
    last_failure_at: float = field(default_factory=time.time)
    task_id: str | None = None
    origin: Origin | None = None
    #: The op's id when the record holds no op body (it was too large to keep whole).
    op_ref: str | None = None

    @classmethod
    def for_error(cls, exc: BaseException, *, op: RedisOp | None, raw: bytes, **fields: Any) -> DeadLetter:
        """The record of an op (or of ``raw`` bytes that are no op) ended by ``exc``.

        The outcome and reason follow from the error: ``rejected`` for an invalid
        message, ``dead`` with this package's reason otherwise (see ``_describe``).
        """
        outcome, reason = _describe(exc)
        kind = type(exc)
        return cls(
            outcome=outcome,
            reason=reason,
            op=op,
            raw=None if op is not None else raw,
            error_type=f"{kind.__module__}.{kind.__qualname__}",
            error_message=str(exc),
            **fields,
        )

    @property
    def op_id(self) -> str | None:
        return self.op.id if self.op is not None else self.op_ref

    def without_op_body(self) -> DeadLetter:
        """This record with the op replaced by the start, size and digest of its encoding."""
        if self.op is None:
            return self
        return replace(self, op=None, raw=encode(self.op), raw_size=None, raw_sha256=None,
                                   op_ref=self.op.id)

    def document(self) -> dict[str, Any]:
        """The record as the JSON-ready dict written to the DLQ topic."""
        origin = self.origin
        tb = self.traceback
        return {
            "v": 1,
            "outcome": self.outcome,
            "reason": self.reason,
            "op": op_document(self.op) if self.op is not None else None,
            **self._raw_fields(),
            **({"op_id": self.op_ref} if self.op_ref is not None else {}),
            "error": {
                "type": self.error_type,
                "message": self.error_message[:4096],
                "traceback": tb if len(tb) <= MAX_TRACEBACK else "...\n" + tb[-MAX_TRACEBACK:],
            },
            "attempts": self.attempts,
            "first_failure_at": self.first_failure_at,
            "last_failure_at": self.last_failure_at,
            "task_id": self.task_id,
            "origin": None if origin is None else origin.to_document(),
        }

    def _raw_fields(self) -> dict[str, Any]:
        if self.raw is None or self.op is not None:
            return {"raw": None}
        return {
            "raw": base64.b64encode(self.raw[:MAX_RAW_BYTES]).decode(),
            "raw_size": self.raw_size if self.raw_size is not None else len(self.raw),
            "raw_sha256": self.raw_sha256 or hashlib.sha256(self.raw).hexdigest(),
        }

    @property
    def raw_truncated(self) -> bool:
        """Whether :attr:`raw` is only the start of the message (see :data:`MAX_RAW_BYTES`)."""
        return self.raw is not None and self.raw_size is not None and len(self.raw) < self.raw_size

    def headers(self) -> list[tuple[str, str | bytes | None]]:
        """The key fields as Kafka headers."""
        values: dict[str, object] = {
            "crr-outcome": self.outcome,
            "crr-reason": self.reason,
            "crr-op-id": self.op_id,
            "crr-error-type": self.error_type,
            "crr-attempts": self.attempts,
            "crr-task-id": self.task_id,
        }
        if self.origin is not None:
            values["crr-origin-topic"] = self.origin.topic
            values["crr-origin-partition"] = self.origin.partition
            values["crr-origin-offset"] = self.origin.offset
        return [(k, str(v).encode()) for k, v in values.items() if v is not None and v != ""]


def _describe(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, DecodeError):
        return "rejected", exc.reason
    if isinstance(exc, RedisRetryError):
        return "dead", exc.reason
    if type(exc).__name__ in ("TimeLimitExceeded", "SoftTimeLimitExceeded"):
        return "dead", "time_limit"
    return "dead", "unexpected_error"


def letter_for_failure(
    message: str | bytes,
    exc: BaseException,
    *,
    origin: Origin | None,
    traceback: str,
    attempts: int,
    task_id: str | None,
    reader: Reader,
) -> tuple[DeadLetter, bytes | None]:
    """The DLQ record (and Kafka key) for an op message whose replay ended with ``exc``.

    ``rejected`` for an invalid message (its raw bytes are kept), ``dead`` otherwise,
    with the reason carried by this package's errors (``retries_exhausted``,
    ``wrong_type``...), ``time_limit``, or ``unexpected_error``.
    """
    raw = message.encode() if isinstance(message, str) else bytes(message)
    op = reader.body(raw)
    letter = DeadLetter.for_error(
        exc,
        op=op,
        raw=raw,
        traceback=traceback,
        attempts=attempts,
        first_failure_at=op.created_at if op is not None else None,
        last_failure_at=time.time(),
        task_id=task_id,
        origin=origin,
    )
    return letter, message_key(op) if op is not None else None


def decode_record(value: bytes) -> DeadLetter:
    """A :class:`DeadLetter` from the bytes of a DLQ record; :class:`DecodeError` if invalid."""
    try:
        # msgspec, not orjson: orjson reads an integer over 64 bits as a float, which would
        # change an op's argument (the wire format carries integers of any size) or refuse it.
        doc = msgspec.json.decode(value)
        op = decode(dumps(doc["op"])) if doc.get("op") is not None else None
        error = doc.get("error") or {}
        return DeadLetter(
            outcome=doc["outcome"],
            reason=doc["reason"],
            op=op,
            raw=base64.b64decode(doc["raw"]) if doc.get("raw") else None,
            raw_size=doc.get("raw_size"),
            raw_sha256=doc.get("raw_sha256"),
            op_ref=doc.get("op_id") if op is None else None,
            error_type=error.get("type", ""),
            error_message=error.get("message", ""),
            traceback=error.get("traceback", ""),
            attempts=doc.get("attempts", 0),
            first_failure_at=doc.get("first_failure_at"),
            last_failure_at=doc.get("last_failure_at") or 0.0,
            task_id=doc.get("task_id"),
            origin=Origin.from_wire(doc.get("origin")),
        )
    except DecodeError:
        raise
    except (msgspec.DecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DecodeError(f"not a DLQ record: {exc}") from None


class DeadLetterWriter:
    """Writes DLQ records and waits for the broker to confirm each one.

    Dead letters are rare, so each write is synchronous: produce, then wait for the
    delivery report, which librdkafka gives within ``message.timeout.ms`` after
    retrying on its own. A failed write is tried again, up to ``attempts`` times, and
    logged at ERROR each time; if all fail, :class:`PublishError` is raised so the
    caller can stop (the bridge pauses the partition and tries again later).

    Until a write succeeded, each write first checks that the DLQ topic exists: on a
    cluster that does not create topics on use, a missing one fails the write at once
    with the topic's name and the command that creates it, instead of after
    ``attempts`` x ``message.timeout.ms`` of "Unknown topic".
    """

    def __init__(self, settings: Settings, *, attempts: int = 5) -> None:
        self.settings = settings
        self.attempts = attempts
        self._producer: kafka.Producer | None = None
        self._lock = threading.Lock()
        self._topic_seen = False

    def _client(self) -> kafka.Producer:
        if self._producer is None:
            # A short delivery timeout: a caller waits for each record, and tries again.
            self._producer = kafka.new_producer(self.settings.kafka, **{"linger.ms": 0, "message.timeout.ms": 10_000})
        return self._producer

    def write(self, letter: DeadLetter, key: bytes | None = None) -> None:
        """Write ``letter`` to ``redis_retry_dlq_topic``; raise PublishError if it cannot."""
        value = dumps(letter.document())
        if len(value) > MAX_RECORD_BYTES:
            letter = letter.without_op_body()
            value = dumps(letter.document())
        headers = letter.headers()
        name = letter.op_id or "<undecodable>"
        with self._lock:
            self._check_topic(name)
            for attempt in range(1, self.attempts + 1):
                error = self._write_once(value, key, headers)
                if error is None:
                    self._topic_seen = True
                    logger.warning(
                        "op %s %s (%s): written to %s", name, letter.outcome, letter.reason, self.settings.dlq_topic
                    )
                    return
                logger.error("DLQ write failed for op %s (attempt %d/%d): %s", name, attempt, self.attempts, error)
        raise PublishError(f"could not write op {name} to {self.settings.dlq_topic}: {error}")

    def _check_topic(self, name: str) -> None:
        if self._topic_seen:
            return
        try:
            kafka.require_topic(self._client(), self.settings.dlq_topic, self.settings.kafka, role="DLQ", timeout=5.0)
        except kafka.TopicMissingError as exc:
            logger.error("DLQ write failed for op %s: %s", name, exc)
            raise PublishError(f"could not write op {name}: {exc}") from exc
        except kafka.KafkaException:
            pass  # Kafka does not answer: the write below retries and reports it

    def _write_once(self, value: bytes, key: bytes | None, headers: list[tuple[str, str | bytes | None]]) -> str | None:
        return kafka.produce_confirmed(self._client(), self.settings.dlq_topic, [(key, value, headers)])[0]

    def close(self, timeout: float = 10.0) -> None:
        """Flush and drop the producer."""
        if self._producer is not None:
            self._producer.flush(timeout)
            self._producer = None
