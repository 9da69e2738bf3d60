"""What the synchronous and the asyncio wrapped clients share: the class plumbing and the pipeline steps.

A wrapped client is a copy of the client whose class has a capturing mixin in front of
its own (:func:`copy_with_capture`); :class:`WrappedClient` is the part of that mixin that
does not depend on whether the client awaits. The ``pipeline_*`` functions are the steps
of a pipeline's capture that both kinds of pipelines run between their own sends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import msgspec
from redis.commands import READ_COMMANDS

from celery_redis_retry import policy
from celery_redis_retry.capture.capturing import Capture, stacked_args
from celery_redis_retry.capture.stamped import StampedStack, StampedWrite
from celery_redis_retry.ops import RedisOp
from celery_redis_retry.slots import slot_of


class WrappedClient:
    """The part of a wrapped client that is the same for redis-py's synchronous and asyncio clients."""

    _crr_capture: Capture
    _crr_plain: Any

    @property
    def uncaptured(self) -> Any:
        """The client that was wrapped: its failed writes are not captured."""
        return self._crr_plain

    def lock(self, *args: Any, **kwargs: Any) -> Any:
        # A lock taken later by a replay would be held by nobody: locks are never captured.
        return self._crr_plain.lock(*args, **kwargs)

    def __del__(self) -> None:
        # The connections belong to the wrapped client, which closes them when it goes away.
        pass

    def __repr__(self) -> str:
        return f"wrap({self._crr_plain!r})"


_classes: dict[tuple[type, type], type] = {}


def capturing_class(base: type, mixin: type) -> type:
    """``base`` with ``mixin`` in front, made once per class."""
    cls = _classes.get((base, mixin))
    if cls is None:
        if issubclass(base, mixin):
            return base
        name = f"Capturing{base.__name__}"
        cls = _classes[(base, mixin)] = type(name, (mixin, base), {"__module__": mixin.__module__})
    return cls


def copy_with_capture(client: Any, capture: Capture, mixin: type) -> Any:
    """A copy of ``client`` (same pool, same options) whose class has ``mixin`` in front."""
    copy: Any = _copy_as(client, capturing_class(type(client), mixin))
    copy._crr_plain = client
    copy._crr_capture = capture
    return copy


def capturing_pipeline(pipe: Any, capture: Capture, mixin: type) -> Any:
    """``pipe`` with ``mixin`` in front of its class (a copy sharing its state, if its class has slots)."""
    cls = capturing_class(type(pipe), mixin)
    if hasattr(pipe, "__dict__"):
        pipe.__class__ = cls
    else:  # redis.asyncio.cluster.ClusterPipeline: its class cannot be swapped for one with a __dict__
        pipe = _copy_as(pipe, cls)
    pipe._crr_capture = capture
    return pipe


def _copy_as(obj: Any, cls: type) -> Any:
    """A shallow copy of ``obj`` as an instance of ``cls``: its ``__dict__`` and its slots
    (redis.asyncio's cluster classes keep their state in slots)."""
    copy: Any = object.__new__(cls)
    copy.__dict__.update(getattr(obj, "__dict__", {}))
    for klass in type(obj).__mro__:
        slots = klass.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__") and hasattr(obj, name):
                object.__setattr__(copy, name, getattr(obj, name))
    return copy


def failed_op(capture: Capture, args: tuple[Any, ...], write: StampedWrite | None, exc: Exception) -> RedisOp | None:
    """The op of the failed call ``args`` (sent as ``write``), or None if it cannot be captured.

    :raises: ``exc`` itself when it is not retryable.
    """
    if not policy.is_retryable(exc):
        raise exc
    op = capture.command_op(args)
    if op is not None and write is not None:
        op = write.issued(op)
    return op


#: Set while a cluster client splits a DEL/UNLINK into a pipeline per slot: that pipeline
#: raises, and the split command is captured whole (see :func:`split_failed_op`).
SPLITTING: ContextVar[bool] = ContextVar("crr_splitting", default=False)


@contextlib.contextmanager
def splitting() -> Iterator[None]:
    """Within: the pipelines a cluster client makes for a split command are not captured."""
    token = SPLITTING.set(True)
    try:
        yield
    finally:
        SPLITTING.reset(token)


def slot_groups(keys: tuple[Any, ...]) -> list[list[Any]]:
    """``keys`` grouped by their cluster hash slot, in the order first seen."""
    groups: dict[int, list[Any]] = {}
    for key in keys:
        groups.setdefault(slot_of(key), []).append(key)
    return list(groups.values())


def split_failed_op(capture: Capture, command: str, groups: list[list[Any]], exc: Exception) -> RedisOp:
    """The op of a failed multi-slot ``DEL``/``UNLINK`` of a cluster client: one command per
    slot in a non-transactional pipeline op, which is replayed one atomic step per slot.

    :raises: ``exc`` itself when it cannot be captured.
    """
    stack: list[Any] = [((command, *keys), {}) for keys in groups]
    return pipeline_failed_op(capture, stack, exc, transaction=False, stamped=None, watched=False)


def pipeline_mode(pipe: Any) -> tuple[list[Any], bool, bool]:
    """A copy of the pipeline's stack (its execute() empties it), whether it WATCHes, whether it is a transaction."""
    # A cluster pipeline has neither WATCH nor an explicit MULTI; an asyncio pipeline
    # says is_transaction where a synchronous one says transaction.
    transaction = (getattr(pipe, "transaction", False) or getattr(pipe, "is_transaction", False)
                   or getattr(pipe, "explicit_transaction", False))
    return list(pipe.command_stack), bool(getattr(pipe, "watching", False)), bool(transaction)


def pipeline_requeue(pipe: Any, stack: list[Any], stamped: StampedStack, missing: list[int]) -> list[int]:
    """Stack again the writes the server refused with NOSCRIPT, with the pipeline's reads
    (so that a read still follows its write); their indexes in ``stack``."""
    again = [i for i, entry in enumerate(stack) if i in missing or _is_read(entry)]
    for index in again:
        write_options = stamped.writes.get(index)
        pipe.command_stack.append(stack[index] if write_options is None else (write_options[0].call, write_options[1]))
    return again


def pipeline_failed_op(
    capture: Capture, stack: list[Any], exc: Exception, *, transaction: bool, stamped: StampedStack | None,
    watched: bool,
) -> RedisOp:
    """The op of a failed pipeline.

    :raises: ``exc`` itself when the pipeline cannot be captured (not retryable, WATCH, empty...).
    """
    if not policy.is_retryable(exc) or watched or not stack:
        raise exc
    commands = [stacked_args(entry) for entry in stack]
    op = None if None in commands else capture.pipeline_op(commands, transaction)  # type: ignore[arg-type]
    if op is None:
        raise exc
    return op if stamped is None else msgspec.structs.replace(op, created_at=stamped.issued_at)


def pipeline_replies(
    pipe: Any, stack: list[Any], stamped: StampedStack, replies: list[Any], raise_on_error: bool
) -> list[Any]:
    """The replies of a pipeline that went through, as redis-py gives them for the plain commands."""
    replies = stamped.parsed(pipe, replies)
    pipe._crr_capture.succeeded()
    if raise_on_error:
        pipe.raise_first_error(stack, replies)
    return replies


def _is_read(entry: Any) -> bool:
    args = stacked_args(entry)
    name = args[0] if args else b""
    return (name.decode() if isinstance(name, bytes) else str(name)).upper() in READ_COMMANDS
