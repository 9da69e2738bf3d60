"""The Celery queue between bridge and worker: fill it fast, count its tasks and the ops they hold."""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit


class QueueCounter:
    """Messages waiting in one Celery queue: LLEN on a Redis broker, a passive declare on RabbitMQ."""

    def __init__(self, app: Any, queue: str) -> None:
        self.queue = queue
        self._redis: Any = None
        self._connection: Any = None
        url = str(app.conf.broker_url)
        if urlsplit(url).scheme in ("redis", "rediss"):
            import redis

            self._redis = redis.Redis.from_url(url)
        else:
            # The queue as Celery itself declares it when publishing (same exchange, durability).
            self._entity = app.amqp.queues[queue]
            self._connection = app.connection_for_write()
            self._connection.ensure_connection(max_retries=3)
            self._channel = self._connection.channel()
            self._entity(self._channel).declare()

    def count(self) -> int:
        if self._redis is not None:
            return int(self._redis.llen(self.queue))
        return int(self._channel.queue_declare(queue=self.queue, passive=True).message_count)

    def ops(self) -> int:
        """Ops held by the tasks in the queue (a ``replay_batch`` task holds several).

        Redis: read without removing. RabbitMQ: the messages are taken off the queue and
        their ops added to a running total, so call it once the queue stopped growing.
        """
        if self._redis is not None:
            return sum(ops_in_task(json.loads(raw)) for raw in self._redis.lrange(self.queue, 0, -1))
        while True:
            message = self._channel.basic_get(self.queue, no_ack=True)
            if message is None:
                return self._taken
            self._taken += _ops_in_body(message.headers.get("task"), message.body)

    _taken = 0

    def purge(self) -> None:
        if self._redis is not None:
            self._redis.delete(self.queue)
        else:
            self._channel.queue_purge(self.queue)

    def close(self, delete: bool = True) -> None:
        """Close; on RabbitMQ also delete the queue (benchmark queues have unique names)."""
        if self._redis is not None:
            if delete:
                self._redis.delete(self.queue)
            self._redis.close()
        else:
            if delete:
                with contextlib.suppress(Exception):  # best effort on a shared server
                    self._channel.queue_delete(self.queue)
            self._connection.release()


def ops_in_task(envelope: dict[str, Any]) -> int:
    """Ops in one task as kombu's Redis transport stores it (JSON envelope, base64 body)."""
    body = envelope["body"]
    if envelope.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    return _ops_in_body(envelope.get("headers", {}).get("task"), body)


def _ops_in_body(task: str | None, body: bytes | str) -> int:
    if task == "celery_redis_retry.replay_batch":
        args = json.loads(body)[0]
        return len(args[0])
    return 1


def prequeue(app: Any, queue: str, calls: Sequence[tuple[str, tuple[Any, ...], dict[str, Any]]],
             link_error: Any = None) -> float:
    """Send ``(task name, args, kwargs)`` tasks to ``queue`` as fast as the broker takes them; return seconds.

    On Redis the sends are pipelined with kombu's ``Producer.batch`` (kombu >= 5.7; others
    publish one by one), so filling a queue does not take as long as the run it prepares.
    """
    start = time.perf_counter()
    with app.producer_or_acquire() as producer:
        batching = producer.batch(500) if hasattr(producer, "batch") else contextlib.nullcontext()
        with batching:
            for name, args, kwargs in calls:
                app.send_task(name, args=args, kwargs=kwargs, queue=queue, link_error=link_error, producer=producer)
    return time.perf_counter() - start
