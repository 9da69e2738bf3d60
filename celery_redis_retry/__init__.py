"""celery_redis_retry: failed Redis writes are recorded in Kafka and replayed by Celery.

The flow, one module per step::

    ops / message       describe the failed write (RedisOp) and its wire format
    producer / capture  publish it to Kafka in microseconds (publish, on_failure)
    bridge              Kafka consumer group -> Celery tasks
    tasks / redis_exec  replay on the target Redis with backoff, or dead-letter it
    dlq                 inspect and replay what could not be applied

Quick use::

    import celery_redis_retry
    from celery_redis_retry import ops

    celery_redis_retry.install(app)
    with celery_redis_retry.on_failure(ops.delete(key), source="UserRepo.delete"):
        r.delete(key)
"""

from __future__ import annotations

from typing import Any

from celery_redis_retry import ops
from celery_redis_retry.capture.guard import default_producer, on_failure, publish
from celery_redis_retry.capture.producer import RetryProducer
from celery_redis_retry.capture.wrap import wrap
from celery_redis_retry.config import Settings, settings_for
from celery_redis_retry.errors import (
    CapturedWriteError,
    CommandNotAllowedError,
    ConfigurationError,
    DecodeError,
    EncodeError,
    PublishError,
    RedisRetryError,
    SignatureError,
)
from celery_redis_retry.ops import RedisOp

__version__ = "0.1.0"


def install(app: Any) -> Any:
    """Register the replay tasks and the ``redis_retry_queue`` queue on an existing Celery app.

    The app's other queues and routes are left as they are. The settings given so far
    are read and validated at once, so bad ``redis_retry_*`` keys stop an application
    process at startup (inside the ``celery`` command line the worker and the
    ``redis-retry`` commands report them instead, in one line). Returns ``app``. Listing
    ``"celery_redis_retry.tasks"`` in the app's ``include`` setting registers the tasks
    too, but only ``install`` adds the queue.

    :raises ConfigurationError: naming the key at fault.
    """
    from celery_redis_retry.tasks import attach

    attach(app)
    from celery_redis_retry.capture.guard import use_app

    use_app(app)
    return app


__all__ = [
    "CapturedWriteError",
    "CommandNotAllowedError",
    "ConfigurationError",
    "DecodeError",
    "EncodeError",
    "PublishError",
    "RedisOp",
    "RedisRetryError",
    "RetryProducer",
    "Settings",
    "SignatureError",
    "__version__",
    "default_producer",
    "install",
    "on_failure",
    "ops",
    "publish",
    "settings_for",
    "wrap",
]
