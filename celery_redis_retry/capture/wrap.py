"""Step 1 of the flow without boilerplate: a redis-py client whose failed writes are captured.

``wrap(client)`` returns a copy of a ``redis.Redis`` client (same connection pool,
same options, same class plus capture) on which a write command that fails with a
retryable error is built into an op and published for replay, exactly as the
:class:`~celery_redis_retry.on_failure` guard would do by hand. ``RedisCluster``,
Sentinel clients and the ``redis.asyncio`` clients are wrapped the same way (the
asyncio ones by :mod:`celery_redis_retry.capture.wrap_async`)::

    r = redis.Redis(host="cache", socket_timeout=0.5, retry=Retry(NoBackoff(), 0))
    cache = celery_redis_retry.wrap(r)
    cache.set("user:42", payload, ex=300)   # Redis down: published, returns None
    cache.get("user:42")                    # reads are never captured: raises

What is captured, and what is not:

* single write commands of :data:`celery_redis_retry.redis_commands.COMMANDS` that the
  producer's ``redis_retry_allowed_commands`` allow, built with
  :func:`celery_redis_retry.ops.command` (relative expiries become absolute);
* ``EVALSHA``/``EVAL`` of a script whose source is registered in
  ``redis_retry_scripts`` (so ``client.register_script(src)(keys=..., args=...)``
  works), as :func:`~celery_redis_retry.ops.script` ops that carry its name only;
* pipelines, as one :func:`~celery_redis_retry.ops.pipeline` op of their write
  commands (reads are dropped), ``transaction=`` kept;
* never: reads; writes whose reply *is* the point (LPOP, SPOP, GETDEL, LMOVE...:
  a replay would throw the popped value away); pipelines that used WATCH (the
  optimistic check cannot be replayed); pipelines holding a command that is
  neither a capturable write nor a known read; locks (``client.lock()`` always
  runs on the plain client); non-retryable errors (WRONGTYPE, syntax...).
  In all these cases the Redis error is raised as if the client were not wrapped.

A captured call returns None (redis-py's "no result": ``SET`` returns True when it
wrote, so None never reads as success) and logs its op id at DEBUG; the first failed
write of a target's outage is a WARNING, a write that goes through again an INFO with
the count (see :data:`WRITE_OUTAGES`). With
``raise_on_capture=True`` it raises :class:`CapturedWriteError` instead, carrying the
op and chained to the Redis error. ``on_capture`` is called with each captured op
(metrics, tracing, tests). If the op cannot be published either (spool full...), the
:class:`~celery_redis_retry.errors.RedisRetryError` that says why is raised from the
Redis error, as ``on_failure`` does.

Every write of the table goes out as one ``EVALSHA`` of ``write_stamped.lua`` that runs
it and stamps its keys with the time it was issued (see :mod:`celery_redis_retry.stamps`),
so that no replay overwrites it; the reply is the plain command's. A non-idempotent write
(INCRBY, LPUSH...) also carries its op id and a marker holding its reply: redis-py's own
retries of it, and the replay of its capture, find the marker instead of applying it again.
Pipelines are stamped command by command, without op ids.

Opting out per call: the client you passed in is unchanged, use it (or
``wrapped.uncaptured``, the same object) for writes that must not be replayed.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from celery_redis_retry.capture.capturing import (
    REPLY_CONSUMING,
    WRITE_OUTAGES,
    Capture,
    op_summary,
    script_names,
)
from celery_redis_retry.capture.producer import RetryProducer
from celery_redis_retry.capture.wrap_async import AsyncCapturingClient
from celery_redis_retry.capture.wrapping import (
    SPLITTING,
    WrappedClient,
    capturing_pipeline,
    copy_with_capture,
    failed_op,
    pipeline_failed_op,
    pipeline_mode,
    pipeline_replies,
    pipeline_requeue,
    slot_groups,
    split_failed_op,
    splitting,
)
from celery_redis_retry.errors import CapturedWriteError
from celery_redis_retry.ops import CRITICAL, Priority, RedisOp
from celery_redis_retry.stamps import WRITE_STAMPED

logger = logging.getLogger(__name__)


R = TypeVar("R")


class _CapturingClient(WrappedClient):
    """Mixed in before a synchronous client's own class: capture around ``execute_command``."""

    def execute_command(self, *args: Any, **options: Any) -> Any:
        capture = self._crr_capture
        write = capture.stamped_write(args)
        try:
            if write is None:
                reply = super().execute_command(*args, **options)  # type: ignore[misc]
                capture.succeeded(args)
                return reply
            reply = write.run(super().execute_command, self, options)  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 - failed_op raises what is not retryable
            return capture.captured(failed_op(capture, args, write, exc), exc)
        if write.op_id is not None and (markers := capture.confirmed(write.keys[-1])):
            _unlink(markers, self._crr_plain)
        capture.succeeded()
        return reply

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        # The client's own defaults: a cluster client's pipeline is not a transaction unless asked.
        pipe = super().pipeline(*args, **kwargs)  # type: ignore[misc]
        return capturing_pipeline(pipe, self._crr_capture, _CapturingPipeline)

    def _split_command_across_slots(self, command: str, *keys: Any) -> Any:
        # A cluster client sends DEL/UNLINK through a pipeline per slot; keys of one slot
        # go through execute_command instead, so the write is stamped like any other
        # (and a captured one returns None, as everywhere).
        groups = slot_groups(keys)
        if len(groups) == 1:
            return self.execute_command(command, *keys)
        try:
            with splitting():
                return super()._split_command_across_slots(command, *keys)  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 - split_failed_op raises what cannot be captured
            return self._crr_capture.captured(split_failed_op(self._crr_capture, command, groups, exc), exc)

    def client(self) -> Any:
        return copy_with_capture(self._crr_plain.client(), self._crr_capture, _CapturingClient)

    def close(self) -> None:
        # The pool belongs to the wrapped client, which closes it when it goes away.
        self._crr_plain.close()


def _unlink(markers: list[bytes], client: Any) -> None:
    """Unlink a batch of confirmed writes' markers; a batch that fails is left to their TTL."""
    try:
        pipe = client.pipeline(transaction=False)
        for key in markers:
            pipe.unlink(key)
        pipe.execute(raise_on_error=False)
    except Exception as exc:  # noqa: BLE001 - the markers expire on their own
        logger.debug("could not unlink %d confirmed write markers: %s", len(markers), exc)


class _CapturingPipeline:
    """Mixed in before a synchronous pipeline's own class: capture around ``execute``."""

    _crr_capture: Capture
    command_stack: list[Any]

    def execute(self, raise_on_error: bool = True) -> Any:
        stack, watched, transaction = pipeline_mode(self)
        capture = self._crr_capture
        stamped = None if watched else capture.stamp_stack(self.command_stack)
        try:
            if stamped is None:
                replies = super().execute(raise_on_error)  # type: ignore[misc]
                capture.succeeded()
                return replies
            if transaction:
                # A transaction cannot be re-run in part: make sure the server has the script.
                self.scripts.add(capture.apply_script(self))  # type: ignore[attr-defined]
            replies = super().execute(False)  # type: ignore[misc]
            if not transaction and (missing := stamped.missing_script(replies)):
                # The server lost its scripts (a restart): those writes did not run. Send them again.
                self.immediate_execute_command("SCRIPT LOAD", WRITE_STAMPED)  # type: ignore[attr-defined]
                again = pipeline_requeue(self, stack, stamped, missing)
                for index, reply in zip(again, super().execute(False), strict=True):  # type: ignore[misc]
                    replies[index] = reply
        except Exception as exc:  # noqa: BLE001 - pipeline_failed_op raises what cannot be captured
            # A pipeline of a split DEL/UNLINK raises: the split command is captured whole.
            op = pipeline_failed_op(capture, stack, exc, transaction=transaction, stamped=stamped,
                                    watched=watched or SPLITTING.get())
            return capture.captured(op, exc)
        return pipeline_replies(self, stack, stamped, replies, raise_on_error)


def _mixin_for(client: Any) -> type:
    """The capturing mixin for ``client``'s class: asyncio clients await their commands."""
    if inspect.iscoroutinefunction(client.execute_command):
        return AsyncCapturingClient
    return _CapturingClient


def wrap(
    client: R,
    *,
    producer: RetryProducer | None = None,
    source: str | None = None,
    target: str = "default",
    raise_on_capture: bool = False,
    on_capture: Callable[[RedisOp], None] | None = None,
    priority: Priority | None = None,
) -> R:
    """A copy of a redis-py ``client`` whose failed writes are published for replay.

    The copy shares the client's connection pool and options and is an instance of
    its class (``isinstance(wrapped, redis.Redis)`` holds); ``client`` itself is left
    as it is. ``producer`` defaults to the process-wide one of the app given to
    :func:`celery_redis_retry.install`. ``source`` names the code in DLQ records
    (default: the calling ``module.function``); ``target`` is the entry of
    ``redis_retry_targets`` this client writes to; ``priority="critical"`` marks every op
    it captures critical (see ``docs/operations.md``, Priorities). See the module
    documentation for what is captured and what a captured call returns.

    :raises TypeError: for an object that is not a redis-py client.
    :raises ValueError: for a ``priority`` other than ``"critical"`` or None.
    :raises ConfigurationError: when ``target`` is not in ``redis_retry_targets`` or its
        URL names another server than the client's (host, port and db; socket path;
        Sentinel service; for a cluster, a node in common). Checked here when the
        settings can be read, else at the first write, which then raises it.
    """
    plain: Any = client
    if isinstance(plain, WrappedClient):
        plain = plain.uncaptured
    execute = getattr(plain, "execute_command", None)
    if execute is None or not hasattr(plain, "__dict__"):
        raise TypeError(f"wrap() takes a redis-py client, got {type(client).__name__}")
    if not isinstance(target, str) or not target:
        raise TypeError(f"target must be a non-empty string, got {target!r}")
    if priority not in (None, CRITICAL):
        raise ValueError(f"priority must be 'critical' or None, got {priority!r}")
    capture = Capture(producer, source, target, raise_on_capture, on_capture, priority=priority)
    capture.check_server(plain)
    wrapped: R = copy_with_capture(plain, capture, _mixin_for(plain))
    return wrapped




__all__ = ["REPLY_CONSUMING", "WRITE_OUTAGES", "CapturedWriteError", "op_summary", "script_names", "wrap"]
