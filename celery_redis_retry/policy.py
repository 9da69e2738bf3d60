"""Pure decisions: is this Redis error worth retrying, and how long to wait before it.

Nothing here does I/O or keeps state, in the spirit of redis-py's backoff classes: a
number in, a number out. Tests make jitter deterministic by passing ``rand``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import redis.exceptions as rex

# First words of Redis error replies that mean "not now" rather than "never":
# LOADING (restarting from disk), READONLY (a replica, mid-failover), MASTERDOWN
# (replica lost its master), TRYAGAIN / CLUSTERDOWN (cluster resharding or failing
# over), BUSY (a slow script; "BUSYKEY"/"BUSYGROUP" are different, permanent errors),
# OOM (maxmemory; eviction may free room), NOREPLICAS (min-replicas-to-write).
RETRYABLE_CODES = frozenset(
    ("LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "BUSY", "OOM", "NOREPLICAS")
)

_RETRYABLE_TYPES: tuple[type[BaseException], ...] = (
    # ConnectionError covers BusyLoadingError, AuthenticationError (a password being
    # rotated is an outage, not a property of the op) and MaxConnectionsError.
    rex.ConnectionError,
    rex.TimeoutError,
    rex.ReadOnlyError,
    rex.TryAgainError,
    rex.ClusterDownError,
    rex.OutOfMemoryError,
    rex.NoPermissionError,
    ConnectionError,  # the builtin: OSError subclasses raised below redis-py
    TimeoutError,
)

# Error classes whose reply came from Redis itself: the command did not run.
_REPLIED_TYPES: tuple[type[BaseException], ...] = (
    rex.BusyLoadingError,
    rex.AuthenticationError,
    rex.ResponseError,
)


def error_code(exc: BaseException) -> str:
    """The Redis error code of a reply error (``WRONGTYPE``, ``ERR``, ``LOADING``...), or ``""``.

    redis-py strips the code from the message for the errors it maps to classes and
    keeps it as ``status_code`` (redis-py >= 6); for the others it is the first word.
    """
    code = getattr(exc, "status_code", None)
    if isinstance(code, str) and code:
        return code
    if isinstance(exc, rex.ResponseError):
        first = str(exc).split(" ", 1)[0]
        return first if first.isupper() else "ERR"
    return ""


def _cluster_unreachable(exc: BaseException) -> bool:
    # A cluster client that reaches none of its nodes raises RedisClusterException
    # ("Redis Cluster cannot be connected...") from the ConnectionError it met.
    return isinstance(exc, rex.RedisClusterException) and isinstance(
        exc.__cause__, (rex.ConnectionError, rex.TimeoutError, ConnectionError, TimeoutError)
    )


def is_retryable(exc: BaseException) -> bool:
    """True when the same op may succeed later: Redis was down, busy, failing over."""
    if isinstance(exc, _RETRYABLE_TYPES) or _cluster_unreachable(exc):
        return True
    return isinstance(exc, rex.ResponseError) and error_code(exc) in RETRYABLE_CODES


#: Reply codes that say the server cannot take writes now, whatever the op: it is
#: loading its dataset, is a replica (mid-failover), lost its master, or is a cluster
#: that is failing over or resharding. They open the target's circuit.
OUTAGE_CODES = frozenset(("LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN"))

_OUTAGE_TYPES: tuple[type[BaseException], ...] = (
    rex.ConnectionError,  # refused, reset, BusyLoadingError (LOADING), a password being rotated
    rex.TimeoutError,
    rex.ReadOnlyError,
    rex.TryAgainError,
    rex.ClusterDownError,
    rex.MasterDownError,
    ConnectionError,
    TimeoutError,
)


def is_outage(exc: BaseException) -> bool:
    """True when ``exc`` says the target is unavailable, not that this op is wrong.

    Such a failure is not the op's: it does not spend one of its attempts, and its
    target's circuit opens (see :mod:`celery_redis_retry.bridge.circuits`). The other retryable
    errors (BUSY, OOM, NOREPLICAS, NOPERM) concern what the op asks and count.
    """
    if isinstance(exc, rex.MaxConnectionsError):
        return False  # this process ran out of connections: the server is fine
    if isinstance(exc, _OUTAGE_TYPES) or _cluster_unreachable(exc):
        return True
    return isinstance(exc, rex.ResponseError) and error_code(exc) in OUTAGE_CODES


def outcome_unknown(exc: BaseException) -> bool:
    """True when Redis may have applied the write although the client saw an error.

    A timeout or a connection lost after the command was written leaves the outcome
    unknown; a refused connection or an error reply from Redis does not.
    """
    if isinstance(exc, _REPLIED_TYPES) or getattr(exc, "status_code", None):
        return False  # Redis answered with an error: the command did not run
    if isinstance(exc, rex.MaxConnectionsError):
        return False  # no connection was free: nothing was sent
    text = str(exc)
    if "connecting to" in text or "Connection refused" in text:
        return False  # the connection was never made
    return isinstance(exc, (rex.TimeoutError, TimeoutError, rex.ConnectionError, ConnectionError))


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with Celery's names and meaning, and a jitter that never hits 0.

    ``factor * 2**retries`` seconds, capped at ``maximum``. Celery's own jitter draws
    from ``[0, countdown]`` and so can retry at once; this one draws from
    ``[countdown/2, countdown]`` ("equal jitter"): still spread out, never immediate.
    ``factor=None`` means ``redis_retry_backoff = False``: a fixed 1 s countdown.
    """

    factor: float | None = 1.0
    maximum: float = 600.0
    jitter: bool = True

    def countdown(self, retries: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number ``retries + 1`` (``retries`` done so far)."""
        if self.factor is None:
            base = min(1.0, self.maximum)
        else:
            base = min(self.maximum, self.factor * 2.0 ** min(retries, 60))
        if self.jitter:
            return base / 2 + rand() * base / 2
        return base

    def total(self, max_retries: int) -> float:
        """The longest time ``max_retries`` retries can take, jitter included."""
        return sum(Backoff(self.factor, self.maximum, jitter=False).countdown(n) for n in range(max_retries))


def permanent_reason(exc: BaseException | str) -> str:
    """The dead-letter reason for a Redis error no retry can fix, from its code and text.

    ``wrong_type`` (WRONGTYPE), ``unknown_command``, ``syntax_error`` (wrong arity,
    bad option, EXECABORT), ``invalid_value`` (not an integer/float, out of range),
    ``cross_slot`` (CROSSSLOT), else ``permanent_error``.
    """
    if isinstance(exc, BaseException):
        code, text = error_code(exc), str(exc)
    else:
        code, text = exc.split(" ", 1)[0], exc
    text = text.lower()
    if code == "WRONGTYPE":
        return "wrong_type"
    if code == "CROSSSLOT":
        return "cross_slot"
    if "unknown command" in text:
        return "unknown_command"
    if code == "EXECABORT" or "wrong number of arguments" in text or "syntax error" in text:
        return "syntax_error"
    if "not an integer" in text or "not a valid float" in text or "out of range" in text:
        return "invalid_value"
    return "permanent_error"
