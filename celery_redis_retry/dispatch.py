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
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from kombu.exceptions import ChannelError

from .errors import RedisRetryError
from .kafka import format_offsets
from .ops import RedisOp
from .tasks import DEAD_LETTER_TASK, REPLAY_BATCH_TASK, REPLAY_TASK

logger = logging.getLogger(__name__)

Partition = tuple[str, int]


class HandoverError(RedisRetryError):
    """Ops could be handed neither to Celery nor to the DLQ; their partitions must stop."""

    reason = "handover_failed"


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
        """Where it came from, as the replay tasks receive it (its first position in Kafka)."""
        return list(self.first_position)


#: Where an op is: read and not handed over yet, handed to Celery and not ended, ended.
CONSUMED, IN_FLIGHT, ENDED = 0, 1, 2


class _Entry:
    __slots__ = ("due", "handovers", "item", "offset", "sent_mark", "state")

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.state = CONSUMED
        self.item: Consumed | None = None
        self.due = 0.0  # monotonic time by which an op in flight should have ended
        self.handovers = 0
        self.sent_mark = 0  # tasks the bridge had sent to the Celery queue once this op's task was in it


#: A hand-over not ended waits up to this many redelivery timeouts before the next (doubling each time).
MAX_REDELIVERY_BACKOFF = 8


class OffsetTracker:
    """Per partition, what became of every offset read, and up to where it is safe to commit.

    An offset is safe once it and every offset before it *ended*. With ``hold_until_end``
    (``redis_retry_commit_after = "end"``) an op handed to Celery is only *in flight*: it
    ends when a worker reports it (:mod:`celery_redis_retry.ends`), and is handed over
    again when it has not within ``redelivery_timeout`` seconds. Without it, the hand-over
    is the end, as when Celery's broker is trusted with the only copy. Ops the bridge ends
    itself (expired, rejected, parked in a waiting topic) end at once either way.

    A partition rewound to its first op not handed over reads again ops that are in
    flight or ended already: :meth:`consumed` says to skip those.
    """

    def __init__(self, *, hold_until_end: bool = False, redelivery_timeout: float = 300.0) -> None:
        self.hold_until_end = hold_until_end
        self.redelivery_timeout = redelivery_timeout
        self._open: dict[Partition, deque[_Entry]] = {}
        self._entries: dict[tuple[str, int, int], _Entry] = {}
        self._ended_before: dict[Partition, set[int]] = {}  # from the commit's metadata
        self._safe: dict[Partition, int] = {}  # the committable offset, once known
        self.in_flight = 0

    def assigned(self, topic: str, partition: int, committed: int, ended: frozenset[int]) -> None:
        """Start a partition at its committed offset, knowing which later offsets ended before."""
        self.forget(topic, partition)
        self._ended_before[(topic, partition)] = {o for o in ended if o >= committed}
        if committed >= 0:
            self._safe[(topic, partition)] = committed

    def consumed(self, topic: str, partition: int, offset: int) -> bool:
        """Note an offset read from Kafka; False when it is in flight or ended already (skip it)."""
        entry = self._entries.get((topic, partition, offset))
        if entry is not None:
            return entry.state == CONSUMED
        entry = self._entries[(topic, partition, offset)] = _Entry(offset)
        self._open.setdefault((topic, partition), deque()).append(entry)
        ended_before = self._ended_before.get((topic, partition))
        if ended_before and offset in ended_before:
            ended_before.discard(offset)
            entry.state = ENDED
            self._advance((topic, partition))
            return False
        return True

    def handed_over(self, topic: str, partition: int, offset: int, item: Consumed | None = None,
                    sent_mark: int = 0) -> int | None:
        """An op went to Celery; return the offset to store if the committable point moved.

        ``sent_mark`` counts the tasks sent to the Celery queue up to and including this
        op's: once fewer tasks wait there than were sent after it, its task left the queue.
        """
        entry = self._entries.get((topic, partition, offset))
        if entry is None or entry.state == ENDED:
            return None  # the partition was revoked meanwhile, or its end came first
        if not self.hold_until_end or item is None:
            return self.ended(topic, partition, offset)
        if entry.state == CONSUMED:
            self.in_flight += 1
        entry.state, entry.item = IN_FLIGHT, item
        entry.handovers += 1
        entry.sent_mark = sent_mark
        # Each hand-over that did not end waits twice as long for the next: ops no worker
        # can end (workers away, an ends topic they cannot write) do not flood the queue.
        backoff = min(2 ** (entry.handovers - 1), MAX_REDELIVERY_BACKOFF)
        entry.due = time.monotonic() + self.redelivery_timeout * backoff
        return None

    def ended(self, topic: str, partition: int, offset: int) -> int | None:
        """An op ended; return the offset to store if the committable point moved."""
        entry = self._entries.get((topic, partition, offset))
        if entry is None or entry.state == ENDED:
            return None  # not ours (another bridge handed it over), or reported twice
        if entry.state == IN_FLIGHT:
            self.in_flight -= 1
        entry.state, entry.item = ENDED, None
        return self._advance((topic, partition))

    def retrying(self, topic: str, partition: int, offset: int, due_in: float) -> None:
        """A worker scheduled the op again ``due_in`` seconds from now: wait for that too."""
        entry = self._entries.get((topic, partition, offset))
        if entry is not None and entry.state == IN_FLIGHT:
            entry.due = max(entry.due, time.monotonic() + max(0.0, due_in) + self.redelivery_timeout)

    def _advance(self, key: Partition) -> int | None:
        queue = self._open[key]
        safe = None
        while queue and queue[0].state == ENDED:
            entry = queue.popleft()
            del self._entries[(key[0], key[1], entry.offset)]
            safe = entry.offset + 1
        if safe is not None:
            self._safe[key] = safe
        return safe

    def overdue(self, now: float | None = None, *, taken: int | None = None) -> list[Consumed]:
        """Ops in flight past their due time (to hand over again), oldest first per partition.

        With ``taken`` (tasks sent minus tasks still waiting in the Celery queue), only the
        ops whose task left the queue: one whose task may still wait there is late, not lost.
        """
        now = time.monotonic() if now is None else now
        return [
            e.item for queue in self._open.values() for e in queue
            if e.state == IN_FLIGHT and e.due <= now and e.item is not None
            and (taken is None or e.sent_mark <= taken)
        ]

    def handovers(self, item: Consumed) -> int:
        """How many times ``item`` was handed to Celery without ending."""
        entry = self._entries.get((item.topic, item.partition, item.offset))
        return entry.handovers if entry is not None else 0

    def first_open(self, topic: str, partition: int) -> int | None:
        """The smallest offset of the partition not handed over yet (where to rewind to)."""
        for entry in self._open.get((topic, partition), ()):
            if entry.state == CONSUMED:
                return entry.offset
        return None

    def commit_point(self, topic: str, partition: int) -> tuple[int, str] | None:
        """The offset to commit and, as its metadata, the offsets past it that ended (None: unknown)."""
        key = (topic, partition)
        queue = self._open.get(key)
        safe = self._safe.get(key) if not queue else queue[0].offset
        if safe is None:
            return None
        ended = [e.offset for e in queue or () if e.state == ENDED]
        ended += (o for o in self._ended_before.get(key, ()) if o >= safe)
        return safe, format_offsets(ended, truncate=True)

    def forget(self, topic: str, partition: int) -> None:
        """Drop a partition's bookkeeping (revoked)."""
        for entry in self._open.pop((topic, partition), ()):
            self._entries.pop((topic, partition, entry.offset), None)
            if entry.state == IN_FLIGHT:
                self.in_flight -= 1
        self._ended_before.pop((topic, partition), None)
        self._safe.pop((topic, partition), None)

    def __len__(self) -> int:
        return len(self._entries)


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
                topic, partition, offset = item.first_position
                kwargs: dict[str, Any] = {"origin": {"topic": topic, "partition": partition, "offset": offset}}
                if self.with_positions:
                    kwargs["position"] = item.position
                self.app.send_task(
                    REPLAY_TASK, args=(item.message,), kwargs=kwargs, queue=self.queue,
                    link_error=self._errback, producer=producer, argsrepr=f"(op {item.op_id})", kwargsrepr="",
                )
        else:
            args: tuple[Any, ...] = ([i.message for i in batch], [i.origin for i in batch])
            if self.with_positions:
                args += ([i.position for i in batch],)
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
