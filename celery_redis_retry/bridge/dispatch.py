"""Step 4b of the flow: group consumed ops into Celery tasks and send them.

One Celery task per op caps the whole system near Celery's publish rate (about 1,700
tasks/s from one process on a Redis broker), far below what Redis replays when
pipelined. So the bridge groups ops for the same target into one
``celery_redis_retry.replay_batch`` task of up to ``redis_retry_batch_size`` ops, sent
when full or after ``redis_retry_batch_linger_ms``.

Critical ops travel apart: a batch holds ops of one target *and* one lane
(:mod:`celery_redis_retry.bridge.lanes`), and critical batches go to
``redis_retry_critical_queue``, which workers take from alongside the replay queue.

Batches of different targets fill at different speeds, so a partition's offsets are
not handed over in order, and ops end in any order: which offsets are safe to commit is
:mod:`celery_redis_retry.bridge.offsets`' to say.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from kombu.exceptions import ChannelError

from celery_redis_retry.bridge.offsets import Consumed, Partition
from celery_redis_retry.dlq.record import Origin
from celery_redis_retry.errors import HandoverError
from celery_redis_retry.names import AT_ORIGINS, DEAD_LETTER_TASK, REPLAY_BATCH_TASK, REPLAY_TASK
from celery_redis_retry.ops import CRITICAL

logger = logging.getLogger(__name__)


@dataclass
class _Batch:
    started: float
    items: list[Consumed] = field(default_factory=list)


#: What a batch is for: a target and a lane (None: ordinary, or "critical").
_BatchKey = tuple[str, "str | None"]


class Batcher:
    """Collects ops per target and lane into batches that are full, or old enough to send."""

    def __init__(self, size: int, linger: float) -> None:
        self.size = size
        self.linger = linger
        self._batches: dict[_BatchKey, _Batch] = {}

    def add(self, target: str, item: Consumed) -> list[Consumed] | None:
        """Add an op; return its target's batch in its lane when that batch is full."""
        key = (target, item.lane)
        batch = self._batches.get(key)
        if batch is None:
            batch = self._batches[key] = _Batch(time.monotonic())
        batch.items.append(item)
        if len(batch.items) >= self.size:
            del self._batches[key]
            return batch.items
        return None

    def due(self, now: float | None = None, *, everything: bool = False) -> list[list[Consumed]]:
        """Take the batches that waited ``linger`` seconds (or all of them)."""
        now = time.monotonic() if now is None else now
        ready = [key for key, b in self._batches.items() if everything or now - b.started >= self.linger]
        return [self._batches.pop(key).items for key in ready]

    def seconds_to_next(self, now: float | None = None) -> float | None:
        """How long until the oldest batch is due, or None when nothing waits."""
        if not self._batches:
            return None
        now = time.monotonic() if now is None else now
        return max(0.0, min(b.started for b in self._batches.values()) + self.linger - now)

    def drop(self, partitions: set[Partition]) -> None:
        """Forget waiting ops of these partitions (they will be read again)."""
        for key in list(self._batches):
            batch = self._batches[key]
            batch.items = [i for i in batch.items if (i.topic, i.partition) not in partitions]
            if not batch.items:
                del self._batches[key]

    def partitions_waiting(self, partitions: set[Partition]) -> list[list[Consumed]]:
        """Take the batches holding ops of these partitions (to send them before a revoke)."""
        taken = [key for key, b in self._batches.items() if any((i.topic, i.partition) in partitions for i in b.items)]
        return [self._batches.pop(key).items for key in taken]


class TaskSender:
    """Hands batches of ops to Celery as replay tasks, and reports how many wait there.

    All the batches of one bridge loop go through one producer from the app's pool
    inside kombu's ``Producer.batch()`` where the transport supports it: on a Redis
    broker the LPUSHes are pipelined (about 3x faster than one round trip each).
    Either every task of the call is accepted, or :class:`HandoverError` is raised and
    none is counted as handed over (re-sending some is harmless: dedupe markers).
    """

    def __init__(self, app: Any, queue: str, *, one_task_per_op: bool, with_positions: bool = False,
                 critical_queue: str | None = None) -> None:
        self.app = app
        self.queue = queue
        #: Where critical batches go (None: the replay queue, as every other batch).
        self.critical_queue = critical_queue or queue
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

    def queue_of(self, batch: list[Consumed]) -> str:
        """The Celery queue of a batch: its lane's (every op of a batch shares the lane)."""
        return self.critical_queue if batch[0].lane == CRITICAL else self.queue

    def _publish(self, producer: Any, batch: list[Consumed]) -> None:
        # argsrepr keeps op values out of Celery's logs, events and Flower, and saves
        # the repr of every message.
        queue = self.queue_of(batch)
        if self.one_task_per_op:
            for item in batch:
                # The object form: workers of earlier releases read replay's origin as one.
                kwargs: dict[str, Any] = {"origin": Origin._make(item.first_position).to_document()}
                if self.with_positions:
                    kwargs["position"] = item.position
                self.app.send_task(
                    REPLAY_TASK, args=(item.message,), kwargs=kwargs, queue=queue,
                    link_error=self._errback, producer=producer, argsrepr=f"(op {item.op_id})", kwargsrepr="",
                )
        else:
            args: tuple[Any, ...] = ([i.message for i in batch], [i.origin for i in batch])
            if self.with_positions:
                parked = any(i.first_origin is not None for i in batch)
                args += ([i.position for i in batch] if parked else AT_ORIGINS,)
            self.app.send_task(
                REPLAY_BATCH_TASK, args=args, queue=queue, link_error=self._errback, producer=producer,
                argsrepr=f"({len(batch)} ops: {batch[0].op_id}..{batch[-1].op_id})", kwargsrepr="",
            )

    def queued_tasks(self) -> int | None:
        """Tasks waiting in the Celery queues of both lanes (not yet taken by a worker), or None if unknown."""
        # A connection of its own: the app's pool may be all lent to producers.
        try:
            if self._watch is None:
                self._watch = self.app.connection_for_write()
            queues = dict.fromkeys((self.queue, self.critical_queue))  # one, when both lanes share it
            return sum(self._waiting_in(queue) for queue in queues)
        except Exception:  # noqa: BLE001 - the broker may be away: unknown, look again later
            self.close()
            return None

    def _waiting_in(self, queue: str) -> int:
        channel = self._watch.channel()  # a failed passive declare closes its channel
        try:
            return int(channel.queue_declare(queue=queue, passive=True).message_count)
        except ChannelError:
            return 0  # no such queue (a Redis broker deletes empty ones): nothing waits
        finally:
            channel.close()

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
