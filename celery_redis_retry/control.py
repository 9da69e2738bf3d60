"""Operators pause and resume targets; the pause lives in a compacted Kafka topic.

``redis_retry_control_topic`` (``<topic>.control``, ``cleanup.policy=compact``) holds one
record per key, the last one written winning: ``target:<name>`` says whether that
target is paused, by whom, since when and why, as JSON::

    {"target": "default", "paused": true, "by": "ops@host1", "reason": "failover", "at": 1767225600.5}

Keys carry a kind: ``policy:<name>`` holds a retry policy rule
(:mod:`celery_redis_retry.retry_policy`), its fields with ``by`` and ``at``; a tombstone
deletes it. Because pauses and rules are Kafka records, not flags in a process, they
survive every bridge and worker restart: each one reads the topic from its beginning
when it starts (:class:`ControlWatch`) and keeps following it. A missing topic means
nothing is paused and no rule is in force.

What a pause does: the bridges treat the target as if its circuit were open (its ops
move to, and stay in, its waiting topic), and workers park the ops they already hold
for it instead of running them, without spending an attempt. See ``docs/operations.md``.
"""

from __future__ import annotations

import getpass
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, cast

from celery_redis_retry import kafka
from celery_redis_retry.config import Settings
from celery_redis_retry.errors import PolicyRuleError, PublishError, UnknownPolicyError, UnknownTargetNameError
from celery_redis_retry.retry_policy import PolicyRecord, PolicyRule, PolicyRules

logger = logging.getLogger(__name__)

#: The kind of control record that pauses or resumes a target.
TARGET_KEY_PREFIX = "target:"
#: The kind of control record that holds a retry policy rule.
POLICY_KEY_PREFIX = "policy:"
#: Seconds a :class:`ControlWatch` waits between looks at a control topic that does not exist yet.
MISSING_TOPIC_RECHECK = 2.0


@dataclass(frozen=True)
class TargetPause:
    """One target's last control record: paused or not, ``by`` whom (user@host), ``at`` what UNIX time."""

    target: str
    paused: bool
    by: str
    reason: str
    at: float

    def describe(self) -> str:
        """``paused by ops@host1: failover`` (or ``resumed by ...``), for logs and status lines."""
        why = f": {self.reason}" if self.reason else ""
        return f"{'paused' if self.paused else 'resumed'} by {self.by}{why}"

    def document(self) -> dict[str, Any]:
        """The record as JSON-ready fields."""
        return asdict(self)


def target_key(target: str) -> bytes:
    """The control topic's key of ``target``'s records."""
    return f"{TARGET_KEY_PREFIX}{target}".encode()


def encode_pause(pause: TargetPause) -> tuple[bytes, bytes]:
    """The key and value of the control record for ``pause``."""
    return target_key(pause.target), json.dumps(pause.document(), sort_keys=True).encode()


def decode_pause(key: bytes | None, value: bytes | None) -> TargetPause | None:
    """The pause a control record holds; None for another kind of record, a tombstone or an unreadable one."""
    if key is None or not key.startswith(TARGET_KEY_PREFIX.encode()) or not value:
        return None
    try:
        fields = json.loads(value)
        return TargetPause(key.decode()[len(TARGET_KEY_PREFIX):], bool(fields["paused"]), str(fields.get("by", "")),
                           str(fields.get("reason", "")), float(fields.get("at", 0.0)))
    except (ValueError, KeyError, TypeError):
        logger.warning("unreadable control record for key %r: ignored", key)
        return None


def latest_pauses(records: Iterable[tuple[bytes | None, bytes | None]]) -> dict[str, TargetPause]:
    """The last record per target of ``records`` (key, value), in the order written; a tombstone forgets one."""
    latest: dict[str, TargetPause] = {}
    for key, value in records:
        if key is not None and key.startswith(TARGET_KEY_PREFIX.encode()) and value is None:
            latest.pop(key.decode()[len(TARGET_KEY_PREFIX):], None)
            continue
        pause = decode_pause(key, value)
        if pause is not None:
            latest[pause.target] = pause
    return latest


def who() -> str:
    """``user@host`` of this process: who pauses, when the caller does not say."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid (a container, say)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def check_target(settings: Settings, target: str) -> None:
    """:class:`UnknownTargetNameError`, naming the known targets, unless ``target`` is one."""
    if target not in settings.targets:
        raise UnknownTargetNameError(
            f"unknown target {target!r}: redis_retry_targets names {', '.join(sorted(settings.targets))}"
        )


def pause(
    settings: Settings, target: str, *, reason: str = "", by: str | None = None, timeout: float = 10.0,
) -> TargetPause:
    """Pause ``target``: write its control record and wait (up to ``timeout`` s) for Kafka to confirm it."""
    check_target(settings, target)
    record = TargetPause(target, True, by or who(), reason, time.time())
    _write(settings, *encode_pause(record), what=f"target {target!r}", timeout=timeout)
    return record


def resume(settings: Settings, target: str, *, by: str | None = None, timeout: float = 10.0) -> TargetPause:
    """Resume ``target``: write its control record and wait (up to ``timeout`` s) for Kafka to confirm it."""
    check_target(settings, target)
    record = TargetPause(target, False, by or who(), "", time.time())
    _write(settings, *encode_pause(record), what=f"target {target!r}", timeout=timeout)
    return record


def _write(settings: Settings, key: bytes, value: bytes | None, *, what: str, timeout: float) -> None:
    """Write one control record (None: a tombstone) and wait for Kafka to confirm it.

    :class:`~celery_redis_retry.kafka.TopicMissingError` when the control topic does not
    exist, :class:`PublishError` when Kafka did not confirm the record.
    """
    producer = kafka.new_producer(settings.kafka, **{"message.timeout.ms": int(timeout * 1000)})
    try:
        kafka.require_topic(producer, settings.control_topic, settings.kafka, role="control", timeout=timeout)
        # value None is a tombstone: confluent-kafka produces it as such (kafka.Record types values as bytes).
        record = cast(kafka.Record, (key, value, None))
        [error] = kafka.produce_confirmed(producer, settings.control_topic, [record])
    finally:
        producer.flush(timeout)
    if error is not None:
        raise PublishError(f"control record for {what} not confirmed by {settings.control_topic}: {error}")


def read_pauses(settings: Settings, *, timeout: float) -> dict[str, TargetPause]:
    """Every target's last control record, reading the control topic to its end (no consumer group).

    A control topic that does not exist reads as empty: nothing is paused.
    """
    messages = kafka.read_to_end(settings.kafka, settings.control_topic, timeout=timeout)
    return latest_pauses((m.key(), m.value()) for m in messages)


# -- retry policy rules --------------------------------------------------------------------


def policy_key(name: str) -> bytes:
    """The control topic's key of rule ``name``."""
    return f"{POLICY_KEY_PREFIX}{name}".encode()


def decode_policy(key: bytes | None, value: bytes | None) -> tuple[str, PolicyRecord | None] | None:
    """``(name, record)`` of a policy control record (record None: a tombstone or an unreadable one);
    None for another kind of record."""
    if key is None or not key.startswith(POLICY_KEY_PREFIX.encode()):
        return None
    name = key.decode(errors="replace")[len(POLICY_KEY_PREFIX):]
    if value is None:
        return name, None
    try:
        return name, PolicyRecord.decode(value)
    except PolicyRuleError as exc:
        logger.warning("unreadable retry policy rule %r in the control topic (%s): ignored", name, exc)
        return name, None


def latest_policies(records: Iterable[tuple[bytes | None, bytes | None]]) -> dict[str, PolicyRecord]:
    """The rules in force after ``records`` (key, value), in the order written."""
    latest: dict[str, PolicyRecord] = {}
    for key, value in records:
        found = decode_policy(key, value)
        if found is None:
            continue
        name, record = found
        if record is None:
            latest.pop(name, None)
        else:
            latest[name] = record
    return latest


def set_policy(
    settings: Settings, rule: PolicyRule, *, broker_conf: Mapping[str, Any] | None = None, by: str | None = None,
    timeout: float = 10.0,
) -> PolicyRecord:
    """Write ``rule`` (replacing the rule of its name) once :meth:`PolicyRule.check` accepts it; wait for Kafka."""
    rule.check(settings, broker_conf)
    record = PolicyRecord(rule, by or who(), time.time())
    _write(settings, policy_key(rule.name), record.encode(), what=f"rule {rule.name!r}", timeout=timeout)
    return record


def delete_policy(settings: Settings, name: str, *, timeout: float = 10.0) -> PolicyRecord:
    """Delete rule ``name`` (a tombstone); :class:`UnknownPolicyError` when no such rule is in force."""
    record = read_policies(settings, timeout=timeout).get(name)
    if record is None:
        raise UnknownPolicyError(f"no retry policy rule named {name!r} (see: redis-retry policy list)")
    _write(settings, policy_key(name), None, what=f"rule {name!r}", timeout=timeout)
    return record


def read_policies(settings: Settings, *, timeout: float) -> dict[str, PolicyRecord]:
    """The retry policy rules in force, reading the control topic to its end; none if it does not exist."""
    return read_control(settings, timeout=timeout)[1]


def read_control(settings: Settings, *, timeout: float) -> tuple[dict[str, TargetPause], dict[str, PolicyRecord]]:
    """Every target's last pause record and the rules in force, in one read of the control topic."""
    records = [(m.key(), m.value()) for m in kafka.read_to_end(settings.kafka, settings.control_topic,
                                                              timeout=timeout)]
    return latest_pauses(records), latest_policies(records)


class ControlWatch:
    """Follows the control topic in a thread, from its beginning: which targets are paused now,
    and which retry policy rules are in force (:meth:`rules`).

    For long-running processes (the bridge, a worker process). ``on_change(pause)`` is
    called, in the watch's thread, each time a target's pause starts or ends (also for
    targets found paused when the watch starts). Reads without a consumer group, as the
    bridge reads the ends topic, so that every process sees every record.
    """

    def __init__(
        self, settings: Settings, *, on_change: Callable[[TargetPause], None] | None = None, poll: float = 0.2,
    ) -> None:
        self.settings = settings
        self.topic = settings.control_topic
        self._on_change = on_change
        self._poll = poll
        self._pauses: dict[str, TargetPause] = {}
        self._policies: dict[str, PolicyRecord] = {}
        self._rules = PolicyRules.of((), settings)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, *, wait: float = 0.0) -> ControlWatch:
        """Start following; with ``wait``, return once the topic was read to its end (or ``wait`` passed)."""
        self._thread = threading.Thread(target=self._follow, name="crr-control-watch", daemon=True)
        self._thread.start()
        if wait:
            self.wait_ready(wait)
        return self

    def stop(self) -> None:
        """Stop following (the thread closes its consumer)."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def wait_ready(self, timeout: float) -> bool:
        """Whether the topic was read to its end within ``timeout`` seconds (a missing topic counts as read)."""
        return self._ready.wait(timeout)

    def pause_of(self, target: str) -> TargetPause | None:
        """``target``'s pause if it is paused now, else None."""
        with self._lock:
            found = self._pauses.get(target)
        return found if found is not None and found.paused else None

    def is_paused(self, target: str) -> bool:
        """Whether ``target`` is paused now."""
        return self.pause_of(target) is not None

    def snapshot(self) -> dict[str, TargetPause]:
        """Every target's last control record read so far."""
        with self._lock:
            return dict(self._pauses)

    def rules(self) -> PolicyRules:
        """The retry policy rules in force now: a snapshot, cheap to read for every op."""
        return self._rules  # replaced whole, never changed in place: no lock needed

    def policies(self) -> dict[str, PolicyRecord]:
        """The rules in force now, with who set them and when."""
        with self._lock:
            return dict(self._policies)

    # -- the thread ----------------------------------------------------------------------

    def _follow(self) -> None:
        consumer = kafka.new_consumer(
            self.settings.kafka, f"celery-redis-retry-control-{id(self)}",
            **{"enable.auto.commit": False, "enable.auto.offset.store": False, "enable.partition.eof": True},
        )
        try:
            unread = self._assign(consumer)
            while not self._stopped.is_set():
                if unread is None:  # no topic yet: look again now and then
                    self._stopped.wait(MISSING_TOPIC_RECHECK)
                    unread = self._assign(consumer)
                    continue
                for message in consumer.consume(500, self._poll):
                    self._take(message, unread)
                if not unread:
                    self._ready.set()
        except Exception:  # a broken follower must not take its process down: it logs, and pauses stay as read
            logger.exception("following control topic %s failed: pauses written from now on are not seen",
                             self.topic)
        finally:
            self._ready.set()
            consumer.close()

    def _assign(self, consumer: kafka.Consumer) -> set[int] | None:
        """Read every partition from its beginning; the partitions not read to their end, or None if no topic."""
        try:
            partitions = kafka.topic_partitions(consumer, self.topic, timeout=10.0)
        except kafka.KafkaException as exc:
            # Ops are not held back for it: until the topic is read, nothing counts as paused.
            logger.warning("control topic %s cannot be looked up (%s): no target counts as paused until it is",
                           self.topic, exc)
            self._ready.set()
            return None
        if not partitions:
            if not self._ready.is_set():
                logger.info("control topic %s does not exist: no target is paused", self.topic)
            self._ready.set()
            return None
        consumer.assign([kafka.TopicPartition(self.topic, p, kafka.OFFSET_BEGINNING) for p in partitions])
        return set(partitions)

    def _take(self, message: kafka.Message, unread: set[int]) -> None:
        error = message.error()
        if error is not None:
            if error.code() == kafka.KafkaError._PARTITION_EOF:
                unread.discard(message.partition() or 0)
            else:
                logger.warning("reading control topic %s: %s", self.topic, error.str())
            return
        key, value = message.key(), message.value()
        policy = decode_policy(key, value)
        if policy is not None:
            self._record_policy(*policy)
            return
        for target, record in latest_pauses([(key, value)]).items():
            self._record(target, record)

    def _record_policy(self, name: str, record: PolicyRecord | None) -> None:
        with self._lock:
            if record is None:
                self._policies.pop(name, None)
            else:
                self._policies[name] = record
            self._rules = PolicyRules.of((r.rule for r in self._policies.values()), self.settings)
        if record is None:
            logger.info("retry policy rule %s deleted", name)
        else:
            logger.info("retry policy rule %s in force, set by %s", record.rule.describe(), record.by)

    def _record(self, target: str, record: TargetPause) -> None:
        with self._lock:
            before = self._pauses.get(target)
            self._pauses[target] = record
        was_paused = before is not None and before.paused
        if record.paused != was_paused and self._on_change is not None:
            self._on_change(record)


def paused_targets(pauses: Mapping[str, TargetPause]) -> list[str]:
    """The names of the targets ``pauses`` shows paused."""
    return sorted(name for name, record in pauses.items() if record.paused)
