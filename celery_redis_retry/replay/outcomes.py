"""What a replay did: the outcome of an op read from Redis' replies.

An op's commands ran as they are (:func:`plain_outcome`) or inside a Lua step
(:func:`parse_once` reads ``apply_once.lua``'s reply). A command's error the target would
not give a moment later (OOM, READONLY, LOADING...) is raised as redis-py would have
raised it, so the op is retried; any other ends the op with a permanent reason
(:func:`checked`). After a failed attempt, :func:`final_error` says whether the op ends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.exceptions
from redis._parsers import _RESP2Parser

from celery_redis_retry import policy
from celery_redis_retry.errors import PermanentReplayError, RedisRetryError, ReplayError, RetriesExhaustedError
from celery_redis_retry.ops import RedisOp

#: What a registered script's wrapper returns when the op's marker exists.
ALREADY_APPLIED = b"CRR-ALREADY-APPLIED"


@dataclass(frozen=True)
class ReplayResult:
    """What running an op on Redis did, to the op and to each of its commands.

    ``outcome`` is ``applied``, ``duplicate`` (a dedupe marker proved it ran before,
    nothing was written) or ``superseded`` (its guard failed: a newer write won, nothing
    was written). Only ``applied`` means the op's commands ran.
    """

    outcome: str
    #: Per command: None if it succeeded (or did not run), else the Redis error it got.
    command_errors: tuple[str | None, ...] = ()


APPLIED_ONE_COMMAND = ReplayResult("applied", (None,))


def parse_once(reply: Any, commands: int) -> ReplayResult:
    if reply[0] == 0:
        return ReplayResult("duplicate", (None,) * commands)
    if reply[0] == 2:
        return ReplayResult("superseded", (None,) * commands)
    return ReplayResult(
        "applied",
        tuple(None if r in (1, 2) else (r.decode() if isinstance(r, bytes) else str(r)) for r in reply[1:]),
    )


_PARSER = _RESP2Parser(socket_read_size=65536)  # type: ignore[no-untyped-call]


def plain_outcome(op: RedisOp, replies: Sequence[Any]) -> ReplayResult:
    """The outcome of commands run as they are; raise the error one of them met.

    A retryable reply (LOADING, READONLY...) is raised as it is, so the op is retried;
    any other error ends it with a permanent reason.
    """
    errors = [r for r in replies if isinstance(r, Exception)]
    if not errors:
        return APPLIED_ONE_COMMAND if len(replies) == 1 else ReplayResult("applied", (None,) * len(replies))
    retryable = [r for r in errors if policy.is_retryable(r)]
    if retryable:
        raise retryable[0]
    return checked(op, ReplayResult("applied", tuple(str(r) if isinstance(r, Exception) else None for r in replies)))


def checked(op: RedisOp, applied: ReplayResult) -> ReplayResult:
    failed = [(i, e) for i, e in enumerate(applied.command_errors) if e is not None]
    if failed:
        # An error the target would not give a moment later (OOM, READONLY, LOADING...)
        # is raised as redis-py would have raised it: the op is retried, not ended.
        for _, message in failed:
            error = _PARSER.parse_error(message)  # type: ignore[no-untyped-call]
            if policy.is_retryable(error):
                raise error
        index, message = failed[0]
        raise PermanentReplayError(
            f"command {index} ({op.commands[index][0]!s}) of op {op.id} failed: {message}"
            + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""),
            reason=policy.permanent_reason(message),
        )
    return applied


def final_error(op: RedisOp, exc: BaseException, retries: int, limit: int) -> BaseException | None:
    """What ends ``op`` after ``exc`` on attempt ``retries + 1``, or None to retry it.

    A retryable Redis error is retried while attempts remain, then ends the op with
    :class:`RetriesExhaustedError`; any other Redis error is permanent; errors of this
    package already say why; anything else is unexpected and ends the op as it is.
    """
    if isinstance(exc, RedisRetryError):
        return exc
    error: ReplayError
    if policy.is_retryable(exc):
        if retries < limit:
            return None
        error = RetriesExhaustedError(
            f"op {op.id} still failing after {retries + 1} attempts: {type(exc).__name__}: {exc}"
        )
    elif isinstance(exc, redis.exceptions.RedisError):
        error = PermanentReplayError(f"op {op.id}: {type(exc).__name__}: {exc}", reason=policy.permanent_reason(exc))
    else:
        return exc
    error.__cause__ = exc
    return error
