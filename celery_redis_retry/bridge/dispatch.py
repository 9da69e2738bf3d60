"""Step 4b of the flow: group consumed ops into Celery tasks, and know which offsets are safe.

One Celery task per op caps the whole system near Celery's publish rate (about 1,700
tasks/s from one process on a Redis broker), far below what Redis replays when
pipelined. So the bridge groups ops for the same target into one
``celery_redis_retry.replay_batch`` task of up to ``redis_retry_batch_size`` ops, sent
when full or after ``redis_retry_batch_linger_ms``.

Batches of different targets fill at different speeds, so a partition's offsets are
not handed over in order, and ops end in any order. :class:`OffsetTracker` keeps, per
partition, what became of each offset read, and only ever allows committing up to the
first op that has not ended: a committed offset never passes an op that may still need
Kafka's copy.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from kombu.exceptions import ChannelError

from celery_redis_retry.dlq.record import Origin
from celery_redis_retry.errors import HandoverError as HandoverError  # noqa: PLC0414 - defined in errors.py, kept importable here
from celery_redis_retry.kafka import format_offsets
from celery_redis_retry.names import AT_ORIGINS, DEAD_LETTER_TASK, REPLAY_BATCH_TASK, REPLAY_TASK
from celery_redis_retry.ops import RedisOp

logger = logging.getLogger(__name__)

Partition = tuple[str, int]


@dataclass(frozen=True)
class Consumed:
    """One valid op read from Kafka, waiting to be handed to Celery."""

    topic: str
    partition: int
    offset: int
    message: str  # the op's wire bytes as text, exactly as read
    op: RedisOp = field(compare=False)
    #: Where a parked op was first read (the retry topic), when it was read from a waiting topic.
    first_origin: tuple[str, int, int] | None = None

    @property
    def op_id(self) -> str:
        return self.op.id

    @property
    def first_position(self) -> tuple[str, int, int]:
        """Where it was first read: the retry topic, even when read now from a waiting topic."""
        return self.first_origin or (self.topic, self.partition, self.offset)

    @property
    def position(self) -> list[str | int]:
        """Where the bridge read it (a waiting topic, for a parked op), as the replay tasks receive it."""
        return [self.topic, self.partition, self.offset]

    @property
    def origin(self) -> list[str | int]:
        """Where it came from, as ``replay_batch`` receives it: :meth:`Origin.to_wire` of its first position.

        Built here without an :class:`Origin` per op: the batches are the bridge's hot path.
        """
        first = self.first_origin
        return [self.topic, self.partition, self.offset] if first is None else list(first)


#: Where an op is: read and not handed over yet, handed to Celery and not ended, ended.
CONSUMED, IN_FLIGHT, ENDED = 0, 1, 2

#: A hand-over not ended waits up to this many redelivery timeouts before the next (doubling each time).
MAX_REDELIVERY_BACKOFF = 8


@dataclass(frozen=True)
class InFlight:
    """An op handed to Celery that has not ended: what it takes to hand it over again."""

    topic: str
    partition: int
    offset: int
    message: str
    first_origin: tuple[str, int, int] | None
    #: Hand-overs so far that did not end.
    handovers: int


# What the tracker keeps of an op in flight:
# (message, first_origin, due, handovers, sent_mark, retrying_since).
# A plain tuple of strings and numbers, on purpose: CPython stops tracking such tuples at
# their first garbage collection, so 100,000 ops in flight add nothing to the full
# collections that a Consumed (and its decoded op) per op made cost about 40% of the
# bridge's CPU time during a drain.
_Flight = tuple[str, tuple[str, int, int] | None, float, int, int, float]


class _Log:
    """One partition's offsets read and not yet committed past, in the order read."""

    __slots__ = ("ended_before", "ended_past_head", "flight", "order", "safe", "state")

    def __init__(self) -> None:
        self.order: deque[int] = deque()
        self.state: dict[int, int] = {}
        self.flight: dict[int, _Flight] = {}
        self.ended_past_head = 0  # ENDED offsets in ``order`` behind one that has not ended
        self.ended_before: set[int] = set()  # from the commit's metadata
        self.safe: int | None = None  # the committable offset, once known


class OffsetTracker:
    """Per partition, what became of every offset read, and up to where it is safe to commit.

    An offset is safe once it and every offset before it *ended*. With ``hold_until_end``
    (``redis_retry_commit_after = "end"``) an op handed to Celery is only *in flight*: it
    ends when a worker reports it (:mod:`celery_redis_retry.bridge.ends`), and is handed over
    again when it has not within ``redelivery_timeout`` seconds. Without it, the hand-over
    is the end, as when Celery's broker is trusted with the only copy. Ops the bridge ends
    itself (expired, rejected, parked in a waiting topic) end at once either way.

    A partition rewound to its first op not handed over reads again ops that are in
    flight or ended already: :meth:`consumed` says to skip those.
    """

    def __init__(self, *, hold_until_end: bool = False, redelivery_timeout: float = 300.0) -> None:
        self.hold_until_end = hold_until_end
        self.redelivery_timeout = redelivery_timeout
        self._logs: dict[Partition, _Log] = {}
        self._earliest_due = float("inf")  # no op in flight is due before this
        self.in_flight = 0
        #: Ops in flight that a worker scheduled again with a countdown (a retry), not ended since.
        self.retrying_ops = 0

    def _log(self, topic: str, partition: int) -> _Log:
        log = self._logs.get((topic, partition))
        if log is None:
            log = self._logs[(topic, partition)] = _Log()
        return log

    def assigned(self, topic: str, partition: int, committed: int, ended: frozenset[int]) -> None:
        """Start a partition at its committed offset, knowing which later offsets ended before."""
        self.forget(topic, partition)
        log = self._log(topic, partition)
        log.ended_before = {o for o in ended if o >= committed}
        if committed >= 0:
            log.safe = committed

    def consumed(self, topic: str, partition: int, offset: int) -> bool:
        """Note an offset read from Kafka; False when it is in flight or ended already (skip it)."""
        log = self._log(topic, partition)
        state = log.state.get(offset)
        if state is not None:
            return state == CONSUMED
        log.order.append(offset)
        if offset in log.ended_before:
            log.ended_before.discard(offset)
            log.state[offset] = ENDED
            log.ended_past_head += 1
            self._advance(log)
            return False
        log.state[offset] = CONSUMED
        return True

    def handed_over(self, topic: str, partition: int, offset: int, item: Consumed | None = None,
                    sent_mark: int = 0) -> int | None:
        """An op went to Celery; return the offset to store if the committable point moved.

        ``sent_mark`` counts the tasks sent to the Celery queue up to and including this
        op's: once fewer tasks wait there than were sent after it, its task left the queue.
        """
        log = self._logs.get((topic, partition))
        state = None if log is None else log.state.get(offset)
        if log is None or state is None or state == ENDED:
            return None  # the partition was revoked meanwhile, or its end came first
        if not self.hold_until_end or item is None:
            return self.ended(topic, partition, offset)
        previous = log.flight.get(offset)
        handovers = 1 if previous is None else previous[3] + 1  # [3]: its hand-overs so far
        if previous is not None and previous[5]:
            self.retrying_ops -= 1  # a new hand-over: no longer known to wait for a retry
        if state == CONSUMED:
            self.in_flight += 1
            log.state[offset] = IN_FLIGHT
        # Each hand-over that did not end waits twice as long for the next: ops no worker
        # can end (workers away, an ends topic they cannot write) do not flood the queue.
        backoff = min(2 ** (handovers - 1), MAX_REDELIVERY_BACKOFF)
        due = time.monotonic() + self.redelivery_timeout * backoff
        log.flight[offset] = (item.message, item.first_origin, due, handovers, sent_mark, 0.0)
        self._earliest_due = min(self._earliest_due, due)
        return None

    def ended(self, topic: str, partition: int, offset: int) -> int | None:
        """An op ended; return the offset to store if the committable point moved."""
        return self.ended_many(topic, partition, (offset,))

    def ended_many(self, topic: str, partition: int, offsets: Iterable[int]) -> int | None:
        """Ops of one partition ended; return the offset to store if the committable point moved.

        Offsets that are not this bridge's (another bridge handed them over) or that
        ended already (reported twice) are ignored.
        """
        log = self._logs.get((topic, partition))
        if log is None:
            return None
        state, flight = log.state, log.flight
        for offset in offsets:
            was = state.get(offset)
            if was is None or was == ENDED:
                continue
            if was == IN_FLIGHT:
                self.in_flight -= 1
                if flight.pop(offset)[5]:
                    self.retrying_ops -= 1
            state[offset] = ENDED
            log.ended_past_head += 1
        return self._advance(log)

    def retrying(self, topic: str, partition: int, offset: int, due_in: float) -> None:
        """A worker scheduled the op again ``due_in`` seconds from now: wait for that too."""
        log = self._logs.get((topic, partition))
        flight = None if log is None else log.flight.get(offset)
        if log is not None and flight is not None:
            message, first_origin, due, handovers, sent_mark, since = flight
            now = time.monotonic()
            if not since:
                since = now
                self.retrying_ops += 1
            due = max(due, now + max(0.0, due_in) + self.redelivery_timeout)
            log.flight[offset] = (message, first_origin, due, handovers, sent_mark, since)

    def oldest_retrying(self, now: float | None = None) -> float | None:
        """Seconds since the longest-waiting op in flight was first scheduled for a retry (None: none is)."""
        now = time.monotonic() if now is None else now
        since = min((f[5] for log in self._logs.values() for f in log.flight.values() if f[5]), default=None)
        return None if since is None else now - since

    def _advance(self, log: _Log) -> int | None:
        order, state = log.order, log.state
        safe = None
        while order and state[order[0]] == ENDED:
            offset = order.popleft()
            del state[offset]
            log.ended_past_head -= 1
            safe = offset + 1
        if safe is not None:
            log.safe = safe
        return safe

    def overdue(self, now: float | None = None, *, taken: int | None = None) -> list[InFlight]:
        """Ops in flight past their due time (to hand over again), oldest first per partition.

        With ``taken`` (tasks sent minus tasks still waiting in the Celery queue), only the
        ops whose task left the queue: one whose task may still wait there is late, not lost.
        """
        now = time.monotonic() if now is None else now
        if now < self._earliest_due:
            return []
        self._earliest_due = min((f[2] for log in self._logs.values() for f in log.flight.values()),
                                 default=float("inf"))
        return [
            InFlight(topic, partition, offset, message, first_origin, handovers)
            for (topic, partition), log in self._logs.items()
            for offset, (message, first_origin, due, handovers, sent_mark, _) in log.flight.items()
            if due <= now and (taken is None or sent_mark <= taken)
        ]

    def first_open(self, topic: str, partition: int) -> int | None:
        """The smallest offset of the partition not handed over yet (where to rewind to)."""
        log = self._logs.get((topic, partition))
        if log is None:
            return None
        return next((o for o in log.order if log.state[o] == CONSUMED), None)

    def commit_point(self, topic: str, partition: int) -> tuple[int, str] | None:
        """The offset to commit and, as its metadata, the offsets past it that ended (None: unknown)."""
        log = self._logs.get((topic, partition))
        if log is None:
            return None
        safe = log.order[0] if log.order else log.safe
        if safe is None:
            return None
        ended = [o for o in log.order if log.state[o] == ENDED] if log.ended_past_head else []
        ended += (o for o in log.ended_before if o >= safe)
        return safe, format_offsets(ended, truncate=True)

    def forget(self, topic: str, partition: int) -> None:
        """Drop a partition's bookkeeping (revoked)."""
        log = self._logs.pop((topic, partition), None)
        if log is not None:
            self.in_flight -= len(log.flight)
            self.retrying_ops -= sum(1 for f in log.flight.values() if f[5])

    def __len__(self) -> int:
        return sum(len(log.state) for log in self._logs.values())


@dataclass
class _Batch:
    started: float
    items: list[Consumed] = field(default_factory=list)


class Batcher:
    """Collects ops per target into batches that are full, or old enough to send."""

    def __init__(self, size: int, linger: float) -> None:
        self.size = size
        self.linger = linger
        self._batches: dict[str, _Batch] = {}

    def add(self, target: str, item: Consumed) -> list[Consumed] | None:
        """Add an op; return its target's batch when that batch is full."""
        batch = self._batches.get(target)
        if batch is None:
            batch = self._batches[target] = _Batch(time.monotonic())
        batch.items.append(item)
        if len(batch.items) >= self.size:
            del self._batches[target]
            return batch.items
        return None

    def due(self, now: float | None = None, *, everything: bool = False) -> list[list[Consumed]]:
        """Take the batches that waited ``linger`` seconds (or all of them)."""
        now = time.monotonic() if now is None else now
        ready = [t for t, b in self._batches.items() if everything or now - b.started >= self.linger]
        return [self._batches.pop(t).items for t in ready]

    def seconds_to_next(self, now: float | None = None) -> float | None:
        """How long until the oldest batch is due, or None when nothing waits."""
        if not self._batches:
            return None
        now = time.monotonic() if now is None else now
        return max(0.0, min(b.started for b in self._batches.values()) + self.linger - now)

    def drop(self, partitions: set[Partition]) -> None:
        """Forget waiting ops of these partitions (they will be read again)."""
        for target in list(self._batches):
            batch = self._batches[target]
            batch.items = [i for i in batch.items if (i.topic, i.partition) not in partitions]
            if not batch.items:
                del self._batches[target]

    def partitions_waiting(self, partitions: set[Partition]) -> list[list[Consumed]]:
        """Take the batches holding ops of these partitions (to send them before a revoke)."""
        taken = [t for t, b in self._batches.items() if any((i.topic, i.partition) in partitions for i in b.items)]
        return [self._batches.pop(t).items for t in taken]


class TaskSender:
    """Hands batches of ops to Celery as replay tasks, and reports how many wait there.

    All the batches of one bridge loop go through one producer from the app's pool
    inside kombu's ``Producer.batch()`` where the transport supports it: on a Redis
    broker the LPUSHes are pipelined (about 3x faster than one round trip each).
    Either every task of the call is accepted, or :class:`HandoverError` is raised and
    none is counted as handed over (re-sending some is harmless: dedupe markers).
    """

    def __init__(self, app: Any, queue: str, *, one_task_per_op: bool, with_positions: bool = False) -> None:
        self.app = app
        self.queue = queue
        self.one_task_per_op = one_task_per_op
        #: Give each op where it was read, so that workers report its end (commit after end).
        self.with_positions = with_positions
        self._errback = app.signature(DEAD_LETTER_TASK)
        self._watch: Any = None

    def send(self, batches: list[list[Consumed]]) -> None:
        """Publish one task per batch (or per op); raise HandoverError if Celery refuses any."""
        try:
            with self.app.producer_or_acquire() as producer, _publish_batch(producer, len(batches)):
                for batch in batches:
                    self._publish(producer, batch)
        except Exception as exc:
            count = sum(len(b) for b in batches)
            raise HandoverError(f"Celery did not accept {count} ops (first {batches[0][0].op_id}): {exc}") from exc

    def _publish(self, producer: Any, batch: list[Consumed]) -> None:
        # argsrepr keeps op values out of Celery's logs, events and Flower, and saves
        # the repr of every message.
        if self.one_task_per_op:
            for item in batch:
                # The object form: workers of earlier releases read replay's origin as one.
                kwargs: dict[str, Any] = {"origin": Origin._make(item.first_position).to_document()}
                if self.with_positions:
                    kwargs["position"] = item.position
                self.app.send_task(
                    REPLAY_TASK, args=(item.message,), kwargs=kwargs, queue=self.queue,
                    link_error=self._errback, producer=producer, argsrepr=f"(op {item.op_id})", kwargsrepr="",
                )
        else:
            args: tuple[Any, ...] = ([i.message for i in batch], [i.origin for i in batch])
            if self.with_positions:
                parked = any(i.first_origin is not None for i in batch)
                args += ([i.position for i in batch] if parked else AT_ORIGINS,)
            self.app.send_task(
                REPLAY_BATCH_TASK, args=args, queue=self.queue, link_error=self._errback, producer=producer,
                argsrepr=f"({len(batch)} ops: {batch[0].op_id}..{batch[-1].op_id})", kwargsrepr="",
            )

    def queued_tasks(self) -> int | None:
        """Tasks waiting in the Celery queue (not yet taken by a worker), or None if unknown."""
        # A connection of its own: the app's pool may be all lent to producers.
        try:
            if self._watch is None:
                self._watch = self.app.connection_for_write()
            channel = self._watch.channel()  # a failed passive declare closes its channel
            try:
                return int(channel.queue_declare(queue=self.queue, passive=True).message_count)
            except ChannelError:
                return 0  # no such queue (a Redis broker deletes empty ones): nothing waits
            finally:
                channel.close()
        except Exception:  # noqa: BLE001 - the broker may be away: unknown, look again later
            self.close()
            return None

    def close(self) -> None:
        """Release the connection used to watch the queue."""
        watch, self._watch = self._watch, None
        if watch is not None:
            try:
                watch.release()
            except Exception:
                logger.debug("closing the queue-watch connection failed", exc_info=True)


def _publish_batch(producer: Any, size: int) -> AbstractContextManager[Any]:
    batch = getattr(producer, "batch", None)  # kombu >= 5.7
    return batch(max(1, size)) if batch is not None else nullcontext()
