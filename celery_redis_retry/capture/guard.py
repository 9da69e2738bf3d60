"""Capturing failed writes in application code: ``publish(op)`` and the ``on_failure`` guard.

Both use one default :class:`~celery_redis_retry.capture.producer.RetryProducer` per process,
configured from the Celery app given to :func:`celery_redis_retry.install` (or Celery's
current app when none was installed).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import redis.exceptions

from celery_redis_retry import policy
from celery_redis_retry.capture.producer import RetryProducer
from celery_redis_retry.config import Settings, settings_for, settings_given
from celery_redis_retry.errors import ConfigurationError, RedisRetryError
from celery_redis_retry.ops import RedisOp

_lock = threading.Lock()
_app: Any = None
_producer: RetryProducer | None = None


def use_app(app: Any) -> None:
    """Make ``app`` the source of the default producer's settings (called by ``install``)."""
    global _app, _producer
    with _lock:
        if _app is not app:
            _app, _producer = app, None


def _source_app() -> Any:
    """The app given to ``install``, else Celery's current app."""
    if _app is None:
        from celery import current_app

        return current_app._get_current_object()
    return _app


def default_producer() -> RetryProducer:
    """The process-wide producer behind :func:`publish` and :func:`on_failure`."""
    global _producer
    producer = _producer
    if producer is None:
        with _lock:
            if _producer is None:
                _producer = RetryProducer.from_app(_source_app())
            producer = _producer
    return producer


def default_settings() -> Settings:
    """The settings the default producer has or will have, without creating it.

    :raises ConfigurationError: when they cannot be read, or are not given yet (an app
        with no ``redis_retry_*`` settings yet is not configured by asking).
    """
    producer = _producer
    if producer is not None:
        return producer.settings
    app = _source_app()
    if not settings_given(app):
        raise ConfigurationError("the app's redis_retry_* settings are not given yet")
    return settings_for(app)


def publish(op: RedisOp) -> str:
    """Publish ``op`` for replay with the default producer; return its id (non-blocking)."""
    return default_producer().publish(op)


class on_failure:
    """Publish ``op`` for replay if the block fails with a retryable Redis error.

    ::

        with celery_redis_retry.on_failure(ops.delete(key), source="UserRepo.delete"):
            r.delete(key)

        async with celery_redis_retry.on_failure(ops.delete(key)):   # redis.asyncio
            await r.delete(key)

    A retryable failure (connection lost, timeout, LOADING, READONLY, MASTERDOWN,
    TRYAGAIN, CLUSTERDOWN, BUSY...) is recorded on the op, the op is published and the
    exception is swallowed: the write will happen later. Every other exception passes
    through untouched. If the op cannot be published either, the
    :class:`~celery_redis_retry.errors.RedisRetryError` that says why is raised from the
    Redis error, so the caller still learns the write is not safe.
    After the block, :attr:`op_id` is the published op's id, or None.
    """

    __slots__ = ("op", "op_id", "producer", "source")

    def __init__(self, op: RedisOp, *, source: str | None = None, producer: RetryProducer | None = None) -> None:
        self.op = op
        self.source = source
        self.producer = producer
        self.op_id: str | None = None

    def __enter__(self) -> on_failure:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        op = self._op_for(exc)
        if op is None:
            return False
        with _raised_from(exc):
            self.op_id = (self.producer or default_producer()).publish(op)
        return True

    async def __aenter__(self) -> on_failure:
        return self

    async def __aexit__(self, *exc_info: Any) -> bool:
        """As :meth:`__exit__`, for ``async with``: a publish that may block runs in a thread."""
        if (op := self._op_for(exc_info[1])) is not None:
            with _raised_from(exc_info[1]):
                self.op_id = await (self.producer or default_producer()).publish_async(op)
        return op is not None

    def _op_for(self, exc: BaseException | None) -> RedisOp | None:
        """The op to publish for ``exc``, or None when the exception must pass through."""
        if exc is None or not isinstance(exc, redis.exceptions.RedisError) or not policy.is_retryable(exc):
            return None
        op = self.op.with_error(exc)
        return op if self.source is None else op.with_source(self.source)


@contextlib.contextmanager
def _raised_from(exc: BaseException | None) -> Iterator[None]:
    """A publish that fails raises the error that says why from the Redis error: the write is not safe."""
    try:
        yield
    except RedisRetryError as error:
        raise error from exc
