"""Step 4 of the flow: the bridge, a Kafka consumer group member that feeds Celery.

For every message of ``redis_retry_topic`` the bridge decodes, verifies and validates
the op, then hands it to Celery: grouped with other ops for the same target into a
``celery_redis_retry.replay_batch`` task (see :mod:`celery_redis_retry.bridge.dispatch`), or
as one ``celery_redis_retry.replay`` task when ``redis_retry_batch_size`` is 1. Either
way ``celery_redis_retry.dead_letter`` is the error callback. Messages that are not
valid ops become ``rejected`` DLQ records.

Offsets are stored only after Celery accepted the task (with publisher confirms on
RabbitMQ) or the DLQ confirmed the record, and committed by librdkafka's auto-commit,
on partition revoke and on shutdown: a committed offset never passes an op that was
not handed over. When a hand-over fails (Celery broker or DLQ unreachable), the
partition is rewound to its first op not handed over and paused with a growing
backoff, then tried again: it is never skipped. Several bridges share the consumer
group to scale out.

Outages: the bridge watches every target's circuit (:mod:`celery_redis_retry.bridge.circuits`).
While a target's circuit is open, its ops read from the retry topic are parked in the
target's waiting topic (:mod:`celery_redis_retry.bridge.waiting`) and their offsets stored, so
the other targets' ops on the same partitions keep flowing; the bridge reads the
waiting topic again once a probe finds the target back, at a rate that ramps up. An op
past its deadline or ``redis_retry_max_age`` ends ``expired`` here, without a task.

At start, the retry topic and the DLQ topic must exist: on a cluster that does not
create topics on use (production: ``auto.create.topics.enable=false``) a missing one
stops the bridge with :class:`~celery_redis_retry.kafka.TopicMissingError` naming it,
instead of a bridge that waits forever for ops or stalls at its first dead letter. On
a broker that creates topics on use (the development broker) looking them up creates
them, as subscribing did before.

Kept whole: the bridge loop is one state machine over one consumer (poll, decide per
op, hand over, park, commit, rebalance, stop); split, its invariants (nothing committed
before it ended; nothing handed over twice within a redelivery timeout) would have to be
read across files. The pieces that stand alone live beside it: grouping and offsets in
:mod:`~celery_redis_retry.bridge.dispatch`, circuits, waiting topics, ends.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from celery_redis_retry import kafka
from celery_redis_retry.bridge.circuits import OPEN, PAUSED, RECOVERING, Circuits, CircuitState, TargetProbe
from celery_redis_retry.bridge.dispatch import Batcher, TaskSender
from celery_redis_retry.bridge.ends import EndsReader
from celery_redis_retry.bridge.lanes import Lanes, PriorityRule
from celery_redis_retry.bridge.offsets import Consumed, InFlight, OffsetTracker, Partition
from celery_redis_retry.bridge.refetch import Refetcher
from celery_redis_retry.bridge.waiting import Parked, ParkedHeaders, WaitingWriter
from celery_redis_retry.config import confirm_task_publishing, settings_for, shown_broker_url, waiting_group
from celery_redis_retry.control import ControlWatch, TargetPause
from celery_redis_retry.dlq.record import DeadLetter, DeadLetterWriter, Origin
from celery_redis_retry.errors import (
    BridgeUnavailableError,
    DecodeError,
    HandoverError,
    PublishError,
    UnknownTargetError,
)
from celery_redis_retry.expiry import ends_expired
from celery_redis_retry.message import Reader, message_key
from celery_redis_retry.ops import RedisOp
from celery_redis_retry.outage_log import UnknownTargetLog

logger = logging.getLogger(__name__)


#: How long a stopping bridge waits for the ops in flight to end before its last commit.
STOP_WAIT_FOR_ENDS = 5.0

#: Hand-overs of one op without an end after which each further one is logged as an error.
HANDOVERS_TO_ALERT = 3

#: Seconds between two sweeps of the lanes' per-key entries (see bridge/lanes.py).
LANES_SWEEP_INTERVAL = 5.0

#: How long a starting bridge waits to have read the control topic (the operators' pauses).
PAUSES_READ_WAIT = 10.0


@dataclass
class _Stall:
    offset: int
    resume_at: float
    #: A target whose circuit must not be open either (a held waiting topic).
    wait_for: str | None = None


@dataclass
class BridgeStats:
    """Counters since start, logged periodically and on exit."""

    dispatched: int = 0
    tasks: int = 0
    rejected: int = 0
    stalls: int = 0
    held: int = 0  # times the Celery queue was too long and reading paused
    parked: int = 0  # ops moved to a waiting topic: their target's circuit was open
    expired: int = 0  # ops past their deadline or redis_retry_max_age, ended here
    redelivered: int = 0  # ops handed over again: they had not ended in redis_retry_redelivery_timeout
    late: int = 0  # overdue ops found still waiting in the Celery queue: late, not lost, not sent again
    ends_read: int = 0  # end records read from the workers
    started: float = field(default_factory=time.monotonic)


def _read(consumer: kafka.Consumer, count: int, timeout: float) -> list[kafka.Message]:
    """Up to ``count`` messages, as soon as one is there (within ``timeout``).

    ``Consumer.consume(count, timeout)`` waits until it has ``count`` messages or the
    timeout passed: at a low rate every op would wait the whole timeout. So wait for one,
    then take what is already fetched.
    """
    first = consumer.poll(timeout)
    return [] if first is None else [first, *consumer.consume(count - 1, 0)]


def _position(message: kafka.Message) -> tuple[str, int, int]:
    """Topic, partition and offset of a consumed message (always set when it has no error)."""
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    assert topic is not None
    assert partition is not None
    assert offset is not None
    return topic, partition, offset


class Bridge:
    """Consumes ops from Kafka and hands each one to Celery, or to the DLQ if invalid."""

    def __init__(
        self,
        app: Any,
        *,
        group: str | None = None,
        batch_size: int | None = None,
        linger_ms: int | None = None,
        poll_timeout: float = 1.0,
        kafka_overrides: Mapping[str, Any] | None = None,
        max_stall: float = 30.0,
        name: str | None = None,
        priority_of: PriorityRule | None = None,
    ) -> None:
        self.app = app
        self.settings = settings_for(app)
        self.group = group or self.settings.consumer_group
        self.batch_size = batch_size or self.settings.batch_size
        linger = self.settings.batch_linger_ms if linger_ms is None else linger_ms
        self.poll_timeout = poll_timeout
        self.max_stall = max_stall
        self.stats = BridgeStats()
        self._overrides = dict(kafka_overrides or {})
        #: Static membership of the two group consumers, for a bridge given a stable name.
        self._membership = kafka.static_membership({**self.settings.kafka, **self._overrides}, name)
        self._stopping = False
        self._batcher = Batcher(self.batch_size, linger / 1000)
        #: Commit after end: Kafka keeps each op until a worker reports it ended (see bridge/ends.py).
        self.holds_until_end = self.settings.commit_after == "end"
        self._offsets = OffsetTracker(hold_until_end=self.holds_until_end,
                                      redelivery_timeout=self.settings.redelivery_timeout)
        self._sender = TaskSender(app, self.settings.queue, one_task_per_op=self.batch_size == 1,
                                  with_positions=self.holds_until_end, critical_queue=self.settings.critical_queue)
        #: Each op's Celery lane; ``priority_of`` is the run-time priority rule (see bridge/lanes.py),
        #: by default the retry policy rules this bridge follows.
        self._lanes = Lanes(self._offsets.is_open, priority_of or self.priority_of)
        self._next_lanes_sweep = 0.0
        self._ends = EndsReader(self.settings, self.group, self._overrides) if self.holds_until_end else None
        self._refetcher = Refetcher(self.settings.kafka, self.group, self._overrides)
        self._to_store: set[Partition] = set()  # partitions whose commit point or metadata changed
        self._next_store = 0.0
        self._next_overdue_check = 0.0
        self._oldest_retrying: float | None = None
        #: Per owned partition of the retry topic: ops past the commit point (read by the metrics thread).
        self.partition_lag: dict[Partition, int] = {}
        self._next_lag_check = 0.0
        self._full = False  # reading paused: redis_retry_max_in_flight ops are in flight
        self._ready: list[list[Consumed]] = []  # full batches, sent at the end of the loop
        self.high_water = self.settings.queue_high_water
        self._held = False  # reading paused: too many tasks wait in the Celery queue
        self._next_depth_check = 0.0
        self._last_depth = 0  # tasks in the Celery queue when last looked at
        #: When the loop last began a turn (``time.monotonic()``; None before it starts): /healthz.
        self.last_turn: float | None = None
        self._sent_since_check = 0
        self._stalled: dict[Partition, _Stall] = {}
        self._failures: dict[Partition, int] = {}  # consecutive, per partition
        # One attempt per hand-over: on failure the partition stalls and is retried with backoff.
        self._dlq = DeadLetterWriter(self.settings, attempts=1)
        self._reader = Reader(self.settings)
        # Two members, two groups: the retry topic's partitions are balanced among the
        # bridges on their own, whatever the waiting topics' assignment is.
        self._consumer: kafka.Consumer | None = None  # the retry topic
        self._waiting_consumer: kafka.Consumer | None = None  # every waiting topic
        self._assigned: set[Partition] = set()
        self._topic_gone_logged_at = -60.0
        self._unknown_targets = UnknownTargetLog(logger, self.settings.topic)
        self._waiting = WaitingWriter(self.settings, parked_by="bridge")
        self._probes = {name: TargetProbe(url) for name, url in self.settings.targets.items()}
        self.circuits = Circuits(
            self.settings.targets, lambda name: self._probes[name](), recovery_rate=self.settings.recovery_rate,
            on_change=self._circuit_changed,
        )
        #: Operators' pauses and retry policy rules (a compacted Kafka topic): a paused target is
        #: held like an open circuit; a rule's deadline ends ops here too.
        self.pauses = ControlWatch(self.settings, on_change=self._pause_changed)

    def priority_of(self, op: RedisOp) -> str | None:
        """``critical``, ``ordinary``, or None: the priority the retry policy rules in force give ``op``."""
        rule = self.pauses.rules().winner(op)  # for every op read: no Decision built
        return None if rule is None else rule.priority

    @property
    def reading_paused(self) -> bool:
        """Whether backpressure has paused reading (too many tasks wait in Celery, or too many ops in flight)."""
        return self._held or self._full

    @property
    def in_flight(self) -> int:
        """Ops handed to Celery that have not ended yet (commit after end)."""
        return self._offsets.in_flight

    @property
    def retrying_ops(self) -> int:
        """Ops in flight that a worker scheduled again with a countdown and that have not ended since."""
        return self._offsets.retrying_ops

    @property
    def oldest_retrying_seconds(self) -> float | None:
        """How long the longest-waiting of :attr:`retrying_ops` has waited since its first retry (None: none).

        Read by the metrics thread: a figure the loop takes every second, never the tracker itself.
        """
        return self._oldest_retrying

    @property
    def assigned_partitions(self) -> int:
        """How many partitions of the retry topic this bridge owns now."""
        return sum(1 for topic, _ in self._assigned if topic == self.settings.topic)

    def _consumer_for(self, topic: str) -> kafka.Consumer:
        consumer = self._consumer if topic == self.settings.topic else self._waiting_consumer
        assert consumer is not None, "the bridge is not running"
        return consumer

    def _consumers(self) -> list[kafka.Consumer]:
        return [c for c in (self._consumer, self._waiting_consumer) if c is not None]

    # -- start and stop ------------------------------------------------------------------

    def _check_celery_broker(self) -> None:
        try:
            with self.app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=2, interval_start=0.5, interval_step=0.5, timeout=5)
        except Exception as exc:
            raise BridgeUnavailableError(
                f"cannot reach the Celery broker {shown_broker_url(self.app.conf)!r}: {exc}"
            ) from exc

    def _connect_kafka(self, group: str, topics: list[str], *, check: bool) -> kafka.Consumer:
        consumer = kafka.new_consumer(
            self.settings.kafka,
            group,
            **{**self._overrides, **self._membership, **kafka.FORCED_CONSUMER},
        )
        try:
            # The lookups are also the reachability check: an unreachable Kafka raises here.
            for role, topic in self._topics() if check else ():
                kafka.require_topic(consumer, topic, self.settings.kafka, role=role)
        except (kafka.TopicMissingError, kafka.KafkaCredentialsError):
            consumer.close()
            raise
        except kafka.KafkaException as exc:
            consumer.close()
            raise BridgeUnavailableError(
                f"cannot reach Kafka at {self.settings.kafka.get('bootstrap.servers')!r}: {exc}"
            ) from exc
        consumer.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke)
        return consumer

    def _topics(self) -> list[tuple[str, str]]:
        waiting = [(f"waiting ({target})", topic) for target, topic in self.settings.waiting_topics.items()]
        ends = [("ends", self.settings.ends_topic)] if self.holds_until_end else []
        return [("retry", self.settings.topic), ("DLQ", self.settings.dlq_topic), *ends, *waiting]

    def stop(self, *_: Any) -> None:
        """Ask the loop to finish what is in flight, commit and return."""
        if not self._stopping:
            logger.info("bridge stopping: finishing in-flight ops and committing offsets")
        self._stopping = True

    def run(self) -> BridgeStats:
        """Run until :meth:`stop` (SIGTERM/SIGINT when installed by the CLI)."""
        confirm_task_publishing(self.app)
        self._check_celery_broker()
        retry = self._consumer = self._connect_kafka(self.group, [self.settings.topic], check=True)
        waiting_topics = self._waiting_consumer = self._connect_kafka(
            waiting_group(self.group), list(self.settings.waiting_topics.values()), check=False
        )
        if self._ends is not None:
            # Before the first hand-over: every end of an op this bridge hands over comes after this.
            try:
                self._ends.start()
            except (kafka.TopicMissingError, kafka.KafkaCredentialsError):
                self._ends.close()
                raise
            except kafka.KafkaException as exc:
                self._ends.close()
                raise BridgeUnavailableError(
                    f"cannot reach Kafka at {self.settings.kafka.get('bootstrap.servers')!r}: {exc}"
                ) from exc
        # Before the first hand-over: a target paused before this bridge started stays paused.
        if not self.pauses.start(wait=PAUSES_READ_WAIT).wait_ready(0):
            logger.warning("control topic %s not read to its end in %g s: pauses apply once it is",
                           self.settings.control_topic, PAUSES_READ_WAIT)
        self.circuits.start()
        instance = self._membership.get("group.instance.id")
        logger.info(
            "bridge consuming %s as group %s%s -> Celery queue %s (critical ops: %s)",
            self.settings.topic, self.group, f" (static member {instance})" if instance else "", self.settings.queue,
            self.settings.critical_queue,
        )
        fetch = max(500, self.batch_size)
        next_report = time.monotonic() + 30
        try:
            while not self._stopping:
                self.last_turn = time.monotonic()
                self._resume_due()
                self._apply_backpressure()
                wait = self._batcher.seconds_to_next()
                timeout = self.poll_timeout if wait is None else min(self.poll_timeout, wait)
                if self._stalled:
                    timeout = min(timeout, 0.25)  # look often at whether a held partition may go on
                waiting = _read(waiting_topics, fetch, 0)
                for message in waiting:
                    self._handle(message)
                # While a backlog drains from a waiting topic, do not sit on the retry topic.
                for message in _read(retry, fetch, 0.05 if waiting else timeout):
                    self._handle(message)
                self._send_all([*self._ready, *self._batcher.due()])
                self._ready.clear()
                self._serve_parked()
                self._read_ends()
                self._hand_over_overdue()
                self._store_offsets()
                self._measure_lag()
                self._sweep_lanes()
                if time.monotonic() >= next_report:
                    self._report()
                    next_report = time.monotonic() + 30
            self._send_all(self._batcher.due(everything=True))
            self._serve_parked(wait=15.0)
        finally:
            self._close()
        return self.stats

    def _measure_lag(self) -> None:
        """Once a second: how many ops each owned partition of the retry topic holds past the
        commit point (Kafka's high watermark, as last fetched, minus it), for the metrics."""
        now = time.monotonic()
        if now < self._next_lag_check or self._consumer is None:
            return
        self._next_lag_check = now + 1.0
        lag: dict[Partition, int] = {}
        for topic, partition in sorted(self._assigned):
            if topic != self.settings.topic:
                continue
            high = self._consumer.get_watermark_offsets(kafka.TopicPartition(topic, partition), cached=True)[1]
            point = self._offsets.commit_point(topic, partition)
            if high >= 0 and point is not None:
                lag[(topic, partition)] = max(0, high - point[0])
        self.partition_lag = lag  # replaced whole: the metrics thread reads one or the other

    def _sweep_lanes(self) -> None:
        """Every few seconds: forget the lanes of keys whose last op ended (they bound nothing now)."""
        now = time.monotonic()
        if now >= self._next_lanes_sweep:
            self._next_lanes_sweep = now + LANES_SWEEP_INTERVAL
            self._lanes.forget_ended()

    def install_signal_handlers(self) -> None:
        """Stop gracefully on SIGTERM and SIGINT."""
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def _close(self) -> None:
        self._await_ends(STOP_WAIT_FOR_ENDS)
        for consumer in self._consumers():
            self._commit(consumer, self._assigned, "final offset commit")
            consumer.close()
        if self._ends is not None:
            self._ends.close()
        self._refetcher.close()
        self.circuits.stop()
        self.pauses.stop()
        for target_probe in self._probes.values():
            target_probe.close()
        self._dlq.close()
        self._waiting.close()
        self._sender.close()
        self._report()

    def _report(self) -> None:
        """The periodic line of counters since start (docs/operations.md, "The bridge's report")."""
        from celery_redis_retry.words import counted

        stats = self.stats
        logger.info(
            "bridge: %s dispatched in %s, %s parked, %s expired, %s rejected, %s, "
            "reading paused %s (Celery queue at high water), %s in flight, %s handed over again in %.0f s",
            counted(stats.dispatched, "op"), counted(stats.tasks, "task"), stats.parked, stats.expired,
            stats.rejected, counted(stats.stalls, "failed hand-over"), counted(stats.held, "time"),
            counted(self.in_flight, "op"), counted(stats.redelivered, "op"), time.monotonic() - stats.started,
        )

    # -- rebalances ----------------------------------------------------------------------

    def _on_assign(self, consumer: kafka.Consumer, partitions: list[kafka.TopicPartition]) -> None:
        logger.info("assigned %s", ", ".join(f"{p.topic}[{p.partition}]" for p in partitions))
        self._assigned.update((p.topic, p.partition) for p in partitions if p.topic is not None)
        if self.holds_until_end and partitions:
            self._resume_commit_points(consumer, partitions)
        if self._held:
            self._next_depth_check = 0.0  # look at the Celery queue now: these are paused too if it is still long

    def _on_revoke(self, consumer: kafka.Consumer, partitions: list[kafka.TopicPartition]) -> None:
        # Hand over what waits in batches, then commit, before another bridge takes these.
        revoked = {(p.topic, p.partition) for p in partitions if p.topic is not None}
        full = [b for b in self._ready if any((i.topic, i.partition) in revoked for i in b)]
        self._ready = [b for b in self._ready if b not in full]
        self._send_all([*full, *self._batcher.partitions_waiting(revoked)])
        self._serve_parked(wait=15.0)  # their offsets are stored before the commit below
        self._read_ends()
        self._commit(consumer, revoked, "commit on revoke")
        self._assigned -= revoked
        for key in revoked:
            self._stalled.pop(key, None)
            self._failures.pop(key, None)
            self._batcher.drop({key})
            self._offsets.forget(*key)
            self._to_store.discard(key)
        logger.info("revoked %s", ", ".join(f"{p.topic}[{p.partition}]" for p in partitions))

    # -- one message ---------------------------------------------------------------------

    def _handle(self, message: kafka.Message) -> None:
        error = message.error()
        if error is not None:
            self._consumer_error(error)
            return
        topic, partition, offset = _position(message)
        if (topic, partition) in self._stalled:
            return  # rewound: it comes again once the partition resumes
        if not self._offsets.consumed(topic, partition, offset):
            return  # read again after a rewind, or ended before a restart: in flight or done
        parked = None
        waiting_for = self.settings.target_of_waiting_topic(topic)
        if waiting_for is not None:
            parked = ParkedHeaders.read(message.headers())
            if self._wait_longer((topic, partition), waiting_for, parked):
                return
        raw: bytes = message.value() or b""
        try:
            op = self._reader.read(raw)
        except DecodeError as exc:
            try:
                self._reject(message, raw, exc)
            except HandoverError as failure:
                self._stall([(topic, partition)], failure)
            else:
                self._ended([(topic, partition, offset)])
            return
        if ends_expired(op, self.settings.max_age, self.pauses.rules().decide(op)):
            self.stats.expired += 1
            self._ended([(topic, partition, offset)])
            return
        lane = self._lanes.lane(message_key(op), op, topic, partition, offset)
        item = Consumed(topic, partition, offset, raw.decode(), op, parked.origin if parked else None, lane)
        full = self._batcher.add(op.target, item)
        if full is not None:
            self._ready.append(full)

    def _consumer_error(self, error: kafka.KafkaError) -> None:
        # librdkafka hands a fatal error to the application as an error event of code
        # _FATAL whose own fatal flag is not set: the consumer will never read again, so
        # stop (a fenced static member, KIP-848's "instance ID still used") instead of idling.
        if error.fatal() or error.code() == kafka.KafkaError._FATAL:
            raise kafka.KafkaException(error)
        if error.code() in kafka.UNKNOWN_TOPIC_CODES:
            self._topic_gone(error)
        elif error.code() != kafka.KafkaError._PARTITION_EOF:
            logger.warning("Kafka: %s", error.str())

    def _topic_gone(self, error: kafka.KafkaError) -> None:
        # The topic was deleted under a running bridge: librdkafka says so on every
        # poll; one line a minute, with the fix, is enough.
        now = time.monotonic()
        if now - self._topic_gone_logged_at >= 60.0:
            self._topic_gone_logged_at = now
            gone = kafka.TopicMissingError(self.settings.topic, str(self.settings.kafka.get("bootstrap.servers")),
                                           role="retry")
            logger.error("%s (%s)", gone, error.str())

    def _send_all(self, waiting: Iterable[list[Consumed]]) -> None:
        batches = self._not_stalled(waiting)
        if not batches:
            return
        batches, to_park = self._admit(batches)
        for target, items in to_park.items():
            self._park(target, items)
        if not batches:
            return
        try:
            self._sender.send(batches)
        except HandoverError as exc:
            self._stall(sorted({(i.topic, i.partition) for b in batches for i in b}), exc)
            return
        tasks = sum(len(b) for b in batches) if self.batch_size == 1 else len(batches)
        self.stats.dispatched += sum(len(b) for b in batches)
        self.stats.tasks += tasks
        self._sent_since_check += tasks
        self._handed_over([i for b in batches for i in b])

    def _not_stalled(self, waiting: Iterable[list[Consumed]]) -> list[list[Consumed]]:
        # Ops of a partition rewound meanwhile will be read again: do not send them twice.
        return [b for b in ([i for i in w if (i.topic, i.partition) not in self._stalled] for w in waiting) if b]

    def _admit(self, batches: list[list[Consumed]]) -> tuple[list[list[Consumed]], dict[str, list[Consumed]]]:
        """Split batches by their target's circuit: what goes to Celery now, what is parked.

        Ops the circuit does not admit (open, or its recovery rate used up) are parked
        when they come from the retry topic; a waiting topic holding them is paused and
        rewound to them instead, to be read again later.
        """
        admitted: list[list[Consumed]] = []
        to_park: dict[str, list[Consumed]] = {}
        holds: dict[Partition, str] = {}
        for batch in batches:
            target = batch[0].op.target
            count = self.circuits.admit(target, len(batch))
            if count:
                admitted.append(batch[:count])
            for item in batch[count:]:
                if self.settings.target_of_waiting_topic(item.topic) is None:
                    to_park.setdefault(target, []).append(item)
                else:
                    holds[(item.topic, item.partition)] = target
        for key, target in holds.items():
            self._hold(key, target)
        if holds:
            admitted = self._not_stalled(admitted)
        return admitted, to_park

    def _park(self, target: str, items: list[Consumed]) -> None:
        """Move ops of a target whose circuit is open to its waiting topic; store their offsets once confirmed.

        The write does not block the loop: other targets' ops keep flowing while the
        broker confirms it (reports are served by :meth:`_serve_parked` every loop).
        """
        parked = [Parked(i.message.encode(), i.op, i.first_position) for i in items]
        reason = self.circuits.reason(target) or "circuit open"

        def confirmed(errors: list[str | None]) -> None:
            failed = [e for e in errors if e is not None]
            if failed:
                error = PublishError(f"{len(failed)} of {len(items)} ops not confirmed by "
                                     f"{self.settings.waiting_topic(target)}: {failed[0]}")
                self._stall(sorted({(i.topic, i.partition) for i in items}), error)
                return
            self.stats.parked += len(items)
            self._ended([(i.topic, i.partition, i.offset) for i in items])

        self._waiting.park_async(target, parked, reason, confirmed)

    def _serve_parked(self, *, wait: float = 0.0) -> None:
        """Deliver the broker's reports of parked ops (storing their offsets); with ``wait``, all of them."""
        if wait:
            self._waiting.flush(wait)
        else:
            self._waiting.poll(0)

    def _handed_over(self, items: list[Consumed]) -> None:
        """Ops Celery accepted: in flight until they end (or ended now, when committing at hand-over)."""
        now, mark, tracker = time.monotonic(), self.stats.tasks, self._offsets
        for item in items:
            if tracker.handed_over(item.topic, item.partition, item.offset, item, mark, now=now) is not None:
                self._to_store.add((item.topic, item.partition))
        if self._failures:
            for key in {(item.topic, item.partition) for item in items}:
                self._failures.pop(key, None)
        self._store_offsets(soon=True)

    def _ended(self, positions: Iterable[tuple[str, int, int]]) -> None:
        """Ops that ended (here, or reported by a worker): the commit point may move past them."""
        by_partition: dict[Partition, list[int]] = {}
        for topic, partition, offset in positions:
            by_partition.setdefault((topic, partition), []).append(offset)
        self._ended_in(by_partition)

    def _ended_in(self, by_partition: Mapping[Partition, list[int]]) -> None:
        """Ops that ended, grouped by partition (the ends of a worker's batch come together)."""
        for key, offsets in by_partition.items():
            self._failures.pop(key, None)
            if self._offsets.ended_many(key[0], key[1], offsets) is not None or self.holds_until_end:
                self._to_store.add(key)
        self._store_offsets(soon=True)

    def _store_offsets(self, *, soon: bool = False) -> None:
        """Store the commit point of every partition where it moved, with what ended past it.

        At most every fifth of a second while ops are in flight (the metadata lists
        them), at once when committing at hand-over (as before). librdkafka's auto-commit
        sends what is stored.
        """
        now = time.monotonic()
        if not self._to_store or (self.holds_until_end and now < self._next_store):
            return
        if soon and self.holds_until_end:
            return  # the loop stores them at its end
        self._next_store = now + 0.2
        by_topic: dict[str, list[kafka.TopicPartition]] = {}
        for topic, partition in self._to_store:
            point = self._offsets.commit_point(topic, partition)
            if point is not None and (topic, partition) in self._assigned:
                by_topic.setdefault(topic, []).append(kafka.TopicPartition(topic, partition, point[0], point[1]))
        self._to_store.clear()
        for topic, offsets in by_topic.items():
            try:
                self._consumer_for(topic).store_offsets(offsets=offsets)
            except kafka.KafkaException as exc:  # revoked meanwhile: the new owner starts from its commit
                logger.debug("storing offsets of %s failed: %s", topic, exc)

    def _commit(self, consumer: kafka.Consumer, partitions: Iterable[Partition], what: str) -> None:
        """Commit the commit points of ``partitions`` (on revoke and shutdown), with their metadata."""
        offsets = []
        for topic, number in partitions:
            point = self._offsets.commit_point(topic, number)
            if point is not None and consumer is self._consumer_for(topic):
                offsets.append(kafka.TopicPartition(topic, number, point[0], point[1]))
        if not offsets:
            return
        try:
            consumer.commit(offsets=offsets, asynchronous=False)
        except kafka.KafkaException as exc:
            if exc.args[0].code() != kafka.KafkaError._NO_OFFSET:
                logger.warning("%s failed: %s", what, exc)

    # -- ends ----------------------------------------------------------------------------

    def _resume_commit_points(self, consumer: kafka.Consumer, partitions: list[kafka.TopicPartition]) -> None:
        """Learn, for newly assigned partitions, what ended past their committed offsets."""
        try:
            committed = consumer.committed(partitions, timeout=10.0)
        except kafka.KafkaException as exc:
            logger.warning("could not read the committed offsets of %d partitions (%s): ops past them that "
                           "ended already are handed over again", len(partitions), exc)
            return
        for tp in committed:
            if tp.topic is None:
                continue
            ended = kafka.parse_offsets(tp.metadata)
            self._offsets.assigned(tp.topic, tp.partition, tp.offset, ended)
            if ended:
                logger.info("%s[%d]: %d ops past committed offset %d ended before: not handed over again",
                            tp.topic, tp.partition, len(ended), tp.offset)

    def _await_ends(self, seconds: float) -> None:
        """Take in ends until no op is in flight, for at most ``seconds`` (a graceful stop)."""
        deadline = time.monotonic() + seconds
        self._read_ends()
        while self._ends is not None and self.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
            self._read_ends()
        if self.in_flight:
            logger.info("stopping with %d ops in flight: they are handed over again from Kafka if they do not end",
                        self.in_flight)

    def _read_ends(self) -> None:
        """Take in the ends workers reported, and the retries they scheduled."""
        if self._ends is None:
            return
        while True:
            reported = self._ends.read()
            if not reported.records:
                return
            self.stats.ends_read += reported.records
            now = time.time()
            for (topic, partition), pairs in reported.retrying.items():
                for offset, due in pairs:
                    self._offsets.retrying(topic, partition, offset, due - now)
            self._ended_in(reported.ended)

    def _hand_over_overdue(self) -> None:
        """Hand over again ops that did not end in time and whose task left the Celery queue.

        An op whose task still waits in the queue is late, not lost (workers are away or
        behind): sending it again would only lengthen the queue. One that left the queue and
        did not end was lost with a worker or the broker (or its end was): the dedupe
        markers make the second copy harmless. Nothing is ever dead-lettered for being late;
        each further hand-over waits twice as long, and from the third on it is an error in
        the log, since workers then take the op and never report it.
        """
        now = time.monotonic()
        if not self.holds_until_end or now < self._next_overdue_check:
            return
        self._next_overdue_check = now + 1.0
        self._oldest_retrying = self._offsets.oldest_retrying(now) if self._offsets.retrying_ops else None

        def unstalled(items: list[InFlight]) -> list[InFlight]:  # a rewound partition reads them again
            return [i for i in items if (i.topic, i.partition) not in self._stalled]

        candidates = unstalled(self._offsets.overdue(now))
        if not candidates:
            self.stats.late = 0
            return
        depth = self._sender.queued_tasks()
        if depth is None:
            return  # the Celery broker cannot say what waits: look again in a second
        taken = self.stats.tasks - depth  # every task sent up to this count has left the queue
        overdue = unstalled(self._offsets.overdue(now, taken=taken))
        self.stats.late = len(candidates) - len(overdue)
        if not overdue:
            return
        items = self._consumed_again(overdue)
        if not items:
            return
        self.stats.redelivered += len(items)
        first = items[0]
        logger.warning(
            "%d ops handed to Celery left its queue and did not end within redis_retry_redelivery_timeout "
            "(%g s): handing them over again (first: op %s at %s[%d]@%d)", len(items),
            self.settings.redelivery_timeout, first.op_id, first.topic, first.partition, first.offset,
        )
        handovers = {(r.topic, r.partition, r.offset): r.handovers for r in overdue}
        stubborn = [i for i in items if handovers[(i.topic, i.partition, i.offset)] >= HANDOVERS_TO_ALERT]
        if stubborn:
            logger.error(
                "%d ops were taken from Celery queue %s %d times or more and never reported ended (first: op %s "
                "at %s[%d]@%d): are the workers consuming it, and can they write to %s?", len(stubborn),
                self.settings.queue, HANDOVERS_TO_ALERT, stubborn[0].op_id, stubborn[0].topic,
                stubborn[0].partition, stubborn[0].offset, self.settings.ends_topic,
            )
        again: dict[tuple[str, str | None], list[Consumed]] = {}
        for item in items:
            again.setdefault((item.op.target, item.lane), []).append(item)
        size = self.batch_size
        self._send_all(batch[i:i + size] for batch in again.values() for i in range(0, len(batch), size))

    def _consumed_again(self, records: list[InFlight]) -> list[Consumed]:
        """Ops in flight as they were read, read again from Kafka to hand over again.

        The tracker keeps neither the message nor the decoded op (see bridge/offsets.py):
        Kafka holds the message until the op ends. It passed these very checks when it was
        read, with the same settings: read again, it cannot be refused. One that cannot be
        read now stays in flight and is looked for again at the next check.
        """
        found = self._refetcher.read((r.topic, r.partition, r.offset) for r in records)
        if len(found) < len(records):
            missing = next(r for r in records if (r.topic, r.partition, r.offset) not in found)
            logger.warning("%d ops in flight to hand over again could not be read from Kafka now (first: %s[%d]@%d): "
                           "looking again in a second", len(records) - len(found), missing.topic, missing.partition,
                           missing.offset)
        again = []
        for record in records:
            raw = found.get((record.topic, record.partition, record.offset))
            if raw is not None:
                op = self._reader.read(raw)
                lane = self._lanes.lane(message_key(op), op, record.topic, record.partition, record.offset)
                again.append(Consumed(record.topic, record.partition, record.offset, raw.decode(), op,
                                      record.first_origin, lane))
        return again

    # -- backpressure --------------------------------------------------------------------

    def _apply_backpressure(self) -> None:
        """Stop reading Kafka while too many tasks wait in the Celery queue.

        Kafka is the durable buffer: a backlog belongs there, not in the Celery
        broker's memory. Reading stops at ``redis_retry_queue_high_water`` waiting tasks
        and starts again at half of it. Ops in flight are bounded too (:meth:`_limit_in_flight`).
        """
        self._limit_in_flight()
        if not self.high_water:
            return
        now = time.monotonic()
        # Look every second, and at once when what was sent since could reach the mark.
        if now < self._next_depth_check and self._last_depth + self._sent_since_check < self.high_water:
            return
        self._next_depth_check = now + (0.25 if self._held else 1.0)
        depth = self._sender.queued_tasks()
        if depth is None:
            return
        self._last_depth, self._sent_since_check = depth, 0
        if not self._held and depth >= self.high_water:
            self._held = True
            self.stats.held += 1
            for consumer in self._consumers():
                consumer.pause(consumer.assignment())
            logger.warning(
                "%d tasks wait in Celery queue %s (redis_retry_queue_high_water %d): reading paused",
                depth, self.settings.queue, self.high_water,
            )
        elif self._held and depth <= self.high_water // 2:
            self._held = False
            if not self._full:
                self._resume_reading()
            logger.info("Celery queue %s down to %d tasks: reading again", self.settings.queue, depth)
        elif self._held:
            for consumer in self._consumers():  # partitions assigned since the pause
                consumer.pause(consumer.assignment())

    def _limit_in_flight(self) -> None:
        """Stop reading Kafka while ``redis_retry_max_in_flight`` ops are in flight; go on at 90% of it."""
        if not self.holds_until_end:
            return
        limit = self.settings.max_in_flight
        if not self._full and self.in_flight >= limit:
            self._full = True
            for consumer in self._consumers():
                consumer.pause(consumer.assignment())
            logger.warning("%d ops handed to Celery have not ended (redis_retry_max_in_flight %d): reading paused",
                           self.in_flight, limit)
        elif self._full and self.in_flight <= limit * 9 // 10:
            self._full = False
            if not self._held:
                self._resume_reading()
            logger.info("%d ops in flight: reading again", self.in_flight)
        elif self._full:
            for consumer in self._consumers():  # partitions assigned since the pause
                consumer.pause(consumer.assignment())

    def _resume_reading(self) -> None:
        for consumer in self._consumers():
            consumer.resume([p for p in consumer.assignment() if (p.topic, p.partition) not in self._stalled])

    # -- circuits ------------------------------------------------------------------------

    def _circuit_changed(self, circuit: CircuitState) -> None:
        # One line per change of state, never one per op.
        waiting = self.settings.waiting_topic(circuit.target)
        if circuit.state == PAUSED:
            logger.warning("target %r %s: its ops wait in %s until it is resumed", circuit.target, circuit.reason,
                           waiting)
        elif circuit.state == OPEN:
            logger.warning("target %r cannot take writes (%s): circuit open; its ops wait in %s",
                           circuit.target, circuit.reason, waiting)
        elif circuit.state == RECOVERING:
            logger.warning("target %r takes writes again: circuit recovering; its ops flow from %s at %d ops/s, "
                           "doubling every second", circuit.target, waiting, self.settings.recovery_rate)
        else:
            logger.info("target %r: circuit closed", circuit.target)

    def _pause_changed(self, pause: TargetPause) -> None:
        if not pause.paused and pause.target in self.settings.targets:
            logger.info("target %r %s: its ops flow again from %s", pause.target, pause.describe(),
                        self.settings.waiting_topic(pause.target))
        self.circuits.set_pause(pause)  # a pause is logged as the circuit's change

    def _origin(self, message: kafka.Message) -> Origin:
        return Origin(*_position(message))

    def _reject(self, message: kafka.Message, raw: bytes, exc: DecodeError) -> None:
        # Rejections are rare: decoding once more for the record keeps read() free of it.
        op = self._reader.body(raw)
        letter = DeadLetter.for_error(exc, op=op, raw=raw, origin=self._origin(message))
        try:
            self._dlq.write(letter, message.key())
        except PublishError as publish_error:
            raise HandoverError(str(publish_error)) from publish_error
        self.stats.rejected += 1
        if isinstance(exc, UnknownTargetError) and op is not None:
            # Likely another app's ops on this topic: told once per target, not once per op.
            self._unknown_targets.met(op.target)
            logger.debug("message %s[%d]@%d rejected: %s", *_position(message), exc)
        else:
            logger.warning("message %s[%d]@%d rejected: %s", *_position(message), exc)

    # -- stalled partitions --------------------------------------------------------------

    def _stall(self, partitions: list[Partition], exc: Exception) -> None:
        """Rewind each partition to its first op not handed over, and pause it for a while."""
        for key in partitions:
            failures = self._failures.get(key, 0) + 1
            delay = min(self.max_stall, 0.5 * 2 ** min(failures, 10))
            offset = self._rewind(key, delay)
            if offset is None:
                continue
            self._failures[key] = failures
            self.stats.stalls += 1
            logger.error(
                "%s[%d]@%d not handed over (%s); partition paused for %.1f s, then tried again from there",
                *key, offset, exc, delay,
            )

    def _hold(self, key: Partition, target: str, delay: float = 0.0) -> None:
        """Pause a waiting topic's partition at its first op not handed over, until its target may take it.

        It resumes after ``delay`` seconds and once the circuit is not open; while the
        circuit recovers and its rate is used up, a fifth of a second later.
        """
        if not delay and self.circuits.state(target) == RECOVERING:
            delay = 0.2
        self._rewind(key, delay, wait_for=target)

    def _wait_longer(self, key: Partition, target: str, parked: ParkedHeaders) -> bool:
        """Hold a waiting topic whose next op may not go yet; True if it was held."""
        delay = parked.not_before - time.time()
        if delay > 0:
            self.circuits.suspect(target)  # a worker met an outage just now: look at once
        if delay > 0 or self.circuits.holding(target):
            self._hold(key, target, max(0.0, delay))
            return True
        return False

    def _rewind(self, key: Partition, delay: float, *, wait_for: str | None = None) -> int | None:
        """Pause ``key`` at its first op not handed over; return that offset (None if nothing is open)."""
        self._batcher.drop({key})
        offset = self._offsets.first_open(*key)  # ops in flight or ended past it are skipped when read again
        if offset is None:
            return None
        self._stalled[key] = _Stall(offset, time.monotonic() + delay, wait_for)
        self._consumer_for(key[0]).pause([kafka.TopicPartition(key[0], key[1], offset)])
        return offset

    def _resume_due(self) -> None:
        now = time.monotonic()
        for (topic, number), stall in list(self._stalled.items()):
            if stall.wait_for is not None and self.circuits.holding(stall.wait_for):
                continue
            if stall.resume_at <= now:
                del self._stalled[(topic, number)]
                partition = kafka.TopicPartition(topic, number, stall.offset)
                consumer = self._consumer_for(topic)
                consumer.seek(partition)
                if not self.reading_paused:  # otherwise it resumes with the others
                    consumer.resume([partition])
