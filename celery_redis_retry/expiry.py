"""When an op has expired: the one rule the bridge and the workers share.

An op ends ``expired`` instead of being replayed when its deadline has passed, when it
is older than ``redis_retry_max_age`` (a retry policy rule's ``deadline`` replaces
both), or when the absolute expiry it carries (``SET ... PXAT``, ``PEXPIREAT``: the
builders turn relative ones into absolute ones at capture) is in the past, since
writing it now would bring back a key that should be gone.
"""

from __future__ import annotations

import logging
import time

from celery_redis_retry.ops import Command, RedisOp
from celery_redis_retry.retry_policy import Decision

logger = logging.getLogger(__name__)


def absolute_expiries(command: Command) -> list[int]:
    """The absolute expiry times (ms) a command carries: SET ... PXAT t, PEXPIREAT k t."""
    name = command[0]
    if name == "PEXPIREAT":
        return [int(command[2])]
    if name == "SET":
        options = command[3:]
        return [
            int(options[i + 1])
            for i, option in enumerate(options[:-1])
            if isinstance(option, str) and option.upper() == "PXAT"
        ]
    return []


def expired(
    op: RedisOp, now: float | None = None, *, max_age: float = 0, decision: Decision | None = None,
) -> str | None:
    """Why ``op`` must not be applied any more, or None.

    Its deadline passed, an absolute expiry it sets (``PXAT``...) passed, or it is older
    than ``max_age`` seconds (``redis_retry_max_age``; 0: no limit). A ``decision`` whose
    rule sets a deadline replaces the op's deadline and ``max_age``.
    """
    now = time.time() if now is None else now
    if decision is not None and decision.deadline is not None:
        if now >= decision.deadline:
            return f"deadline of retry policy rule {decision.rule} passed {now - decision.deadline:.3f} s ago"
        return _expiry_passed(op, now)
    if op.deadline is not None and now >= op.deadline:
        return f"deadline passed {now - op.deadline:.3f} s ago"
    if max_age and now >= op.created_at + max_age:
        return f"older than redis_retry_max_age ({max_age:g} s) by {now - op.created_at - max_age:.3f} s"
    return _expiry_passed(op, now)


def _expiry_passed(op: RedisOp, now: float) -> str | None:
    """Why an absolute expiry ``op`` sets makes it stale at ``now``, or None."""
    now_ms = now * 1000
    for command in op.commands:
        for at in absolute_expiries(command):
            if at <= now_ms:
                return f"{command[0]!s} expiry passed {(now_ms - at) / 1000:.3f} s ago"
    return None


def ends_expired(op: RedisOp, max_age: float, decision: Decision | None = None) -> bool:
    """Whether ``op`` ends ``expired`` now (see :func:`expired`); logged with the reason when it does."""
    why = expired(op, max_age=max_age, decision=decision)
    if why is not None:
        logger.info("op %s expired: %s", op.id, why)
    return why is not None
