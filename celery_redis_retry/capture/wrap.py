"""Step 1 of the flow without boilerplate: a redis-py client whose failed writes are captured.

``wrap(client)`` returns a copy of a ``redis.Redis`` client (same connection pool,
same options, same class plus capture) on which a write command that fails with a
retryable error is built into an op and published for replay, exactly as the
:class:`~celery_redis_retry.on_failure` guard would do by hand::

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

import msgspec
from redis.commands import READ_COMMANDS

from celery_redis_retry import policy
from celery_redis_retry.capture.capturing import (
    REPLY_CONSUMING,
    WRITE_OUTAGES,
    Capture,
    op_summary,
    script_names,
    stacked_args,
)
from celery_redis_retry.capture.producer import RetryProducer
from celery_redis_retry.errors import CapturedWriteError
from celery_redis_retry.ops import RedisOp
from celery_redis_retry.slots import slot_of
from celery_redis_retry.stamps import WRITE_STAMPED

logger = logging.getLogger(__name__)


R = TypeVar("R")



















class _CapturingClient:
    """Mixed in before the client's own class: capture around ``execute_command``."""

    _crr_capture: Capture
    _crr_plain: Any

    def execute_command(self, *args: Any, **options: Any) -> Any:
        capture = self._crr_capture
        write = capture.stamped_write(args)
        try:
            if write is None:
                reply = super().execute_command(*args, **options)  # type: ignore[misc]
                capture.succeeded(args)
                return reply
            reply = write.run(super().execute_command, self, options)  # type: ignore[misc]
        except Exception as exc:
            if not policy.is_retryable(exc):
                raise
            op = capture.command_op(args)
            if op is not None and write is not None:
                op = write.issued(op)
            return capture.captured(op, exc)
        if write.op_id is not None:
            capture.forget_marker(write.keys[-1], self._crr_plain)
        capture.succeeded()
        return reply

    @property
    def uncaptured(self) -> Any:
        """The client that was wrapped: its failed writes are not captured."""
        return self._crr_plain

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)  # type: ignore[misc]
        pipe.__class__ = _capturing_class(type(pipe), _CapturingPipeline)
        pipe._crr_capture = self._crr_capture
        return pipe

    def _split_command_across_slots(self, command: str, *keys: Any) -> Any:
        # A cluster client sends DEL/UNLINK through a pipeline per slot; keys of one slot
        # go through execute_command instead, so the write is stamped like any other
        # (and a captured one returns None, as everywhere).
        if len({slot_of(key) for key in keys}) == 1:
            return self.execute_command(command, *keys)
        return super()._split_command_across_slots(command, *keys)  # type: ignore[misc]

    def lock(self, *args: Any, **kwargs: Any) -> Any:
        # A lock taken later by a replay would be held by nobody: locks are never captured.
        return self._crr_plain.lock(*args, **kwargs)

    def client(self) -> Any:
        return _copy_with_capture(self._crr_plain.client(), self._crr_capture)

    def close(self) -> None:
        # The pool belongs to the wrapped client, which closes it when it goes away.
        self._crr_plain.close()

    def __del__(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"wrap({self._crr_plain!r})"


class _CapturingPipeline:
    """Mixed in before the pipeline's own class: capture around ``execute``."""

    _crr_capture: Capture
    command_stack: list[Any]
    watching: bool
    transaction: bool
    explicit_transaction: bool

    def execute(self, raise_on_error: bool = True) -> Any:
        # execute() empties the stack whatever happens: keep what it held.
        stack = list(self.command_stack)
        # A cluster pipeline has neither WATCH nor an explicit MULTI.
        watched = getattr(self, "watching", False)
        transaction = bool(getattr(self, "transaction", False) or getattr(self, "explicit_transaction", False))
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
                # The server lost its scripts (a restart): those writes did not run. Send them
                # again, with the reads of the pipeline, so that a read still follows its write.
                self.immediate_execute_command("SCRIPT LOAD", WRITE_STAMPED)  # type: ignore[attr-defined]
                again = [i for i, entry in enumerate(stack) if i in missing or _is_read(entry)]
                for index in again:
                    write_options = stamped.writes.get(index)
                    self.command_stack.append(stack[index] if write_options is None else
                                              (write_options[0].call, write_options[1]))
                for index, reply in zip(again, super().execute(False), strict=True):  # type: ignore[misc]
                    replies[index] = reply
        except Exception as exc:
            if not policy.is_retryable(exc) or watched or not stack:
                raise
            commands = [stacked_args(entry) for entry in stack]
            op = None if None in commands else capture.pipeline_op(commands, transaction)  # type: ignore[arg-type]
            if op is not None and stamped is not None:
                op = msgspec.structs.replace(op, created_at=stamped.issued_at)
            return capture.captured(op, exc)
        replies = stamped.parsed(self, replies)
        capture.succeeded()
        if raise_on_error:
            self.raise_first_error(stack, replies)  # type: ignore[attr-defined]
        return replies


def _is_read(entry: Any) -> bool:
    args = stacked_args(entry)
    name = args[0] if args else b""
    return (name.decode() if isinstance(name, bytes) else str(name)).upper() in READ_COMMANDS




_classes: dict[tuple[type, type], type] = {}


def _capturing_class(base: type, mixin: type) -> type:
    """``base`` with ``mixin`` in front, made once per class."""
    cls = _classes.get((base, mixin))
    if cls is None:
        if issubclass(base, mixin):
            return base
        cls = _classes[(base, mixin)] = type(f"Capturing{base.__name__}", (mixin, base), {"__module__": __name__})
    return cls


def _copy_with_capture(client: Any, capture: Capture) -> Any:
    copy: Any = object.__new__(_capturing_class(type(client), _CapturingClient))
    copy.__dict__.update(client.__dict__)
    copy._crr_plain = client
    copy._crr_capture = capture
    return copy


def wrap(
    client: R,
    *,
    producer: RetryProducer | None = None,
    source: str | None = None,
    target: str = "default",
    raise_on_capture: bool = False,
    on_capture: Callable[[RedisOp], None] | None = None,
) -> R:
    """A copy of a redis-py ``client`` whose failed writes are published for replay.

    The copy shares the client's connection pool and options and is an instance of
    its class (``isinstance(wrapped, redis.Redis)`` holds); ``client`` itself is left
    as it is. ``producer`` defaults to the process-wide one of the app given to
    :func:`celery_redis_retry.install`. ``source`` names the code in DLQ records
    (default: the calling ``module.function``); ``target`` is the entry of
    ``redis_retry_targets`` this client writes to. See the module documentation for
    what is captured and what a captured call returns.

    :raises TypeError: for an asyncio client (not supported yet) or a non-client.
    :raises ConfigurationError: when ``target`` is not in ``redis_retry_targets`` or its
        URL names another server than the client's (host, port and db; socket path;
        Sentinel service; for a cluster, a node in common). Checked here when the
        settings can be read, else at the first write, which then raises it.
    """
    plain: Any = client
    if isinstance(plain, _CapturingClient):
        plain = plain.uncaptured
    execute = getattr(plain, "execute_command", None)
    if execute is None or not hasattr(plain, "__dict__"):
        raise TypeError(f"wrap() takes a redis-py client, got {type(client).__name__}")
    if inspect.iscoroutinefunction(execute):
        raise TypeError("wrap() does not support redis.asyncio clients yet; use the on_failure guard")
    if not isinstance(target, str) or not target:
        raise TypeError(f"target must be a non-empty string, got {target!r}")
    capture = Capture(producer, source, target, raise_on_capture, on_capture)
    capture.check_server(plain)
    wrapped: R = _copy_with_capture(plain, capture)
    return wrapped




__all__ = ["REPLY_CONSUMING", "WRITE_OUTAGES", "CapturedWriteError", "op_summary", "script_names", "wrap"]
