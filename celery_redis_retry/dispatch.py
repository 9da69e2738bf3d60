"""Step 4b of the flow: group consumed ops into Celery tasks, and know which offsets are safe.

One Celery task per op caps the whole system near Celery's publish rate (about 1,700
tasks/s from one process on a Redis broker), far below what Redis replays when
pipelined. So the bridge groups ops for the same target into one
``celery_redis_retry.replay_batch`` task of up to ``redis_retry_batch_size`` ops, sent
when full or after ``redis_retry_batch_linger_ms``.

Batches of different targets fill at different speeds, so a partition's offsets are
not handed over in order. :class:`OffsetTracker` keeps, per partition, the offsets
consumed but not yet handed over, and only ever allows committing up to the first one
still open: a committed offset never passes an op that Celery has not accepted.
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
    def origin(self) -> list[str | int]:
        """Where it came from, as the replay tasks receive it (its first position in Kafka)."""
        return list(self.first_position)


class OffsetTracker:
    """Per partition, the consumed offsets that are not yet safe to commit, in order."""

    def __init__(self) -> None:
        self._open: dict[Partition, deque[list[int | bool]]] = {}
        self._entries: dict[tuple[str, int, int], list[int | bool]] = {}

    def consumed(self, topic: str, partition: int, offset: int) -> None:
        """Note an offset read from Kafka (offsets of a partition arrive in order)."""
        entry: list[int | bool] = [offset, False]
        self._open.setdefault((topic, partition), deque()).append(entry)
        self._entries[(topic, partition, offset)] = entry

    def handed_over(self, topic: str, partition: int, offset: int) -> int | None:
        """Mark an offset done; return the offset to store if the committable point moved."""
        entry = self._entries.pop((topic, partition, offset), None)
        if entry is None:
            return None  # the partition was rewound or revoked meanwhile
        entry[1] = True
        queue = self._open[(topic, partition)]
        safe = None
        while queue and queue[0][1]:
            safe = int(queue.popleft()[0]) + 1
        return safe

    def first_open(self, topic: str, partition: int) -> int | None:
        """The smallest offset of the partition not handed over yet (where to rewind to)."""
        queue = self._open.get((topic, partition))
        return int(queue[0][0]) if queue else None

    def forget(self, topic: str, partition: int) -> None:
        """Drop a partition's bookkeeping (rewound, or revoked)."""
        for entry in self._open.pop((topic, partition), ()):
            self._entries.pop((topic, partition, int(entry[0])), None)

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

    def __init__(self, app: Any, queue: str, *, one_task_per_op: bool) -> None:
        self.app = app
        self.queue = queue
        self.one_task_per_op = one_task_per_op
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
                origin = {"topic": topic, "partition": partition, "offset": offset}
                self.app.send_task(
                    REPLAY_TASK, args=(item.message,), kwargs={"origin": origin}, queue=self.queue,
                    link_error=self._errback, producer=producer, argsrepr=f"(op {item.op_id})", kwargsrepr="",
                )
        else:
            self.app.send_task(
                REPLAY_BATCH_TASK, args=([i.message for i in batch], [i.origin for i in batch]), queue=self.queue,
                link_error=self._errback, producer=producer,
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
