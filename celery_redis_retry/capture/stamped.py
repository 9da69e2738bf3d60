"""A write sent stamped: one ``EVALSHA`` of ``write_stamped.lua`` that runs it and records when it was issued.

:class:`StampedWrite` is one such write (with its op id and marker when it is not
idempotent), :class:`StampedStack` a pipeline's writes rewritten in place; both give
back the replies redis-py would have parsed for the plain commands.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import redis
from redis.exceptions import NoScriptError

from celery_redis_retry.ops import RedisOp
from celery_redis_retry.stamps import WRITE_STAMPED, WRITE_STAMPED_SHA


class StampedWrite:
    """One write sent through ``write_stamped.lua``: applied with its stamp (and marker), its
    reply given back as the plain command's would be."""

    __slots__ = ("argv", "issued_at", "keys", "name", "op_id")

    def __init__(self, name: str, issued_at: float, op_id: str | None, keys: list[Any], argv: list[Any]) -> None:
        self.name = name
        self.issued_at = issued_at
        self.op_id = op_id
        self.keys = keys
        self.argv = argv

    @property
    def call(self) -> tuple[Any, ...]:
        """The ``EVALSHA`` that sends this write."""
        return ("EVALSHA", WRITE_STAMPED_SHA, len(self.keys), *self.keys, *self.argv)

    def run(self, execute: Callable[..., Any], client: Any, options: dict[str, Any]) -> Any:
        """Send the write with ``execute`` (the client's own), loading the script if needed."""
        try:
            reply = execute(*self.call, **options)
        except NoScriptError:
            execute("SCRIPT LOAD", WRITE_STAMPED)
            reply = execute(*self.call, **options)
        return self.parsed(client, reply, options)

    async def run_async(self, execute: Callable[..., Any], client: Any, options: dict[str, Any]) -> Any:
        """:meth:`run` with an asyncio client's ``execute``."""
        try:
            reply = await execute(*self.call, **options)
        except NoScriptError:
            await execute("SCRIPT LOAD", WRITE_STAMPED)
            reply = await execute(*self.call, **options)
        return self.parsed(client, reply, options)

    def parsed(self, client: Any, reply: Any, options: dict[str, Any]) -> Any:
        """``reply`` as redis-py returns it for the plain command (``SET`` -> True...)."""
        if isinstance(reply, Exception):
            return reply
        callbacks = getattr(client, "response_callbacks", None) or _default_callbacks()
        callback = callbacks.get(self.name)
        return callback(reply, **options) if callback is not None else reply

    def issued(self, op: RedisOp) -> RedisOp:
        """``op`` (the capture of this write) with the id and issue time the write was sent with.

        Its replay then carries the same stamp, and finds the marker if Redis applied
        the write although its reply was lost.
        """
        return msgspec.structs.replace(op, id=self.op_id or op.id, created_at=self.issued_at)


class StampedStack:
    """A pipeline's writes rewritten into stamped steps: where they are, and how to read their replies."""

    __slots__ = ("issued_at", "writes")

    def __init__(self, issued_at: float, writes: dict[int, tuple[StampedWrite, dict[str, Any]]]) -> None:
        self.issued_at = issued_at
        self.writes = writes

    def parsed(self, client: Any, replies: list[Any]) -> list[Any]:
        """The pipeline's replies, each stamped write's as its plain command's would be."""
        out = list(replies)
        for index, (write, options) in self.writes.items():
            out[index] = write.parsed(client, out[index], options)
        return out

    def missing_script(self, replies: list[Any]) -> list[int]:
        """Indexes of the stamped writes the server refused with NOSCRIPT (it lost its scripts)."""
        return [i for i in self.writes if isinstance(replies[i], NoScriptError)]


_callbacks: dict[str, Any] = {}


def _default_callbacks() -> Any:
    # A cluster client parses replies per node with redis-py's standard callbacks.
    if not _callbacks:
        _callbacks.update(redis.Redis().response_callbacks)
    return _callbacks
