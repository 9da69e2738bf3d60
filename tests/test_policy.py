"""Pure policy: which Redis errors are worth a retry, which leave the outcome unknown, how long to wait.

Reply errors are built the way redis-py's parser builds them from the server's reply, so
these tests follow what redis-py really raises (class, stripped message, status_code).
"""

from __future__ import annotations

import pytest
import redis.exceptions as rex
from hypothesis import given
from hypothesis import strategies as st
from redis._parsers.base import BaseParser
from redis._parsers.socket import SERVER_CLOSED_CONNECTION_ERROR

from celery_redis_retry.policy import Backoff, error_code, is_outage, is_retryable, outcome_unknown


def reply(text: str) -> BaseException:
    """The exception redis-py raises for the error reply ``text`` (e.g. ``"LOADING ..."``)."""
    exc: BaseException = BaseParser.parse_error(text)
    return exc


RETRYABLE_REPLIES = [
    "LOADING Redis is loading the dataset in memory",
    "READONLY You can't write against a read only replica.",
    "TRYAGAIN Multiple keys request during rehashing of slot",
    "CLUSTERDOWN The cluster is down",
    "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
    "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
    "OOM command not allowed when used memory > 'maxmemory'.",
    "NOREPLICAS Not enough good replicas to write.",
]
PERMANENT_REPLIES = [
    "WRONGTYPE Operation against a key holding the wrong kind of value",
    "ERR wrong number of arguments for 'set' command",
    "ERR syntax error",
    "ERR value is not an integer or out of range",
    "BUSYGROUP Consumer Group name already exists",
    "BUSYKEY Target key name already exists.",
    "EXECABORT Transaction discarded because of previous errors.",
    "CROSSSLOT Keys in request don't hash to the same slot",
]


@pytest.mark.parametrize("text", RETRYABLE_REPLIES)
def test_outage_replies_are_retryable(text: str) -> None:
    exc = reply(text)
    assert is_retryable(exc)
    assert error_code(exc) == text.split(" ", 1)[0]
    assert not outcome_unknown(exc)  # Redis answered: the write did not run


@pytest.mark.parametrize("text", PERMANENT_REPLIES)
def test_permanent_replies_are_not_retryable(text: str) -> None:
    exc = reply(text)
    assert not is_retryable(exc)
    assert error_code(exc) == text.split(" ", 1)[0]
    assert not outcome_unknown(exc)


def test_max_clients_is_retryable() -> None:
    # redis-py raises this reply as a ConnectionError. outcome_unknown() currently says
    # True for it (safe: the replay only takes the dedupe path) although Redis refused the
    # connection before any command ran; not asserted here either way.
    exc = reply("ERR max number of clients reached")
    assert isinstance(exc, rex.ConnectionError)
    assert is_retryable(exc)


def test_the_parser_builds_what_the_policy_expects() -> None:
    # If redis-py ever changes these, the policy must be looked at again.
    assert type(reply("LOADING x")) is rex.BusyLoadingError
    assert type(reply("MASTERDOWN x")) is rex.MasterDownError
    assert type(reply("OOM x")) is rex.OutOfMemoryError
    assert type(reply("BUSY x")) is rex.ResponseError
    assert type(reply("WRONGTYPE x")) is rex.ResponseError


@pytest.mark.parametrize(
    "exc",
    [
        rex.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused."),
        rex.ConnectionError(SERVER_CLOSED_CONNECTION_ERROR),
        rex.TimeoutError("Timeout reading from socket"),
        rex.BusyLoadingError("Redis is loading the dataset in memory", status_code="LOADING"),
        rex.ReadOnlyError("You can't write against a read only replica.", status_code="READONLY"),
        rex.TryAgainError("Multiple keys request during rehashing of slot"),
        rex.ClusterDownError("The cluster is down"),
        rex.MasterDownError("Link with MASTER is down"),
        rex.MaxConnectionsError("Too many connections"),
        ConnectionRefusedError(111, "Connection refused"),
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError("timed out"),  # also socket.timeout, its alias
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_connection_level_errors_are_retryable(exc: BaseException) -> None:
    assert is_retryable(exc)


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("bad"),
        KeyError("k"),
        rex.DataError("Invalid input of type: 'dict'"),
        rex.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
        rex.ResponseError("wrong number of arguments for 'set' command"),  # code stripped: ERR
        rex.WatchError("Watched variable changed."),
    ],
    ids=lambda exc: type(exc).__name__ + ":" + str(exc)[:12],
)
def test_other_errors_are_not_retryable(exc: BaseException) -> None:
    assert not is_retryable(exc)


def test_error_code() -> None:
    assert error_code(reply("ERR wrong number of arguments for 'set' command")) == "ERR"
    assert error_code(rex.ResponseError("no code here")) == "ERR"
    assert error_code(rex.ResponseError("WRONGTYPE Operation")) == "WRONGTYPE"
    assert error_code(ValueError("LOADING")) == ""


@pytest.mark.parametrize(
    ("exc", "unknown"),
    [
        (rex.TimeoutError("Timeout reading from socket"), True),
        (TimeoutError("timed out"), True),
        (rex.ConnectionError(SERVER_CLOSED_CONNECTION_ERROR), True),
        (rex.ConnectionError("Error 104 while writing to socket. Connection reset by peer."), True),
        (ConnectionResetError(104, "Connection reset by peer"), True),
        (rex.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused."), False),
        (ConnectionRefusedError(111, "Connection refused"), False),
        (reply("LOADING Redis is loading the dataset in memory"), False),
        (reply("READONLY You can't write against a read only replica."), False),
        (reply("WRONGTYPE Operation against a key holding the wrong kind of value"), False),
        (reply("WRONGPASS invalid username-password pair"), False),
        (ValueError("x"), False),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else str(value),
)
def test_outcome_unknown(exc: BaseException, unknown: bool) -> None:
    assert outcome_unknown(exc) is unknown


# -- backoff -----------------------------------------------------------------------------


def test_exponential_backoff_is_capped() -> None:
    backoff = Backoff(factor=1.0, maximum=600.0, jitter=False)
    assert [backoff.countdown(n) for n in range(11)] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600]
    assert Backoff(factor=2.5, maximum=1000.0, jitter=False).countdown(3) == 20.0
    assert backoff.countdown(10_000) == 600.0  # no OverflowError for absurd retry counts
    assert Backoff(factor=0.1, maximum=0.3, jitter=False).countdown(5) == 0.3


def test_fixed_backoff_when_factor_is_none() -> None:
    fixed = Backoff(factor=None, maximum=600.0, jitter=False)
    assert {fixed.countdown(n) for n in range(20)} == {1.0}
    assert Backoff(factor=None, maximum=0.5, jitter=False).countdown(3) == 0.5
    assert Backoff(factor=None, maximum=600.0).countdown(0, rand=lambda: 0.0) == 0.5


def test_jitter_bounds_are_reached_exactly() -> None:
    backoff = Backoff(factor=1.0, maximum=600.0, jitter=True)
    assert backoff.countdown(3, rand=lambda: 0.0) == 4.0
    assert backoff.countdown(3, rand=lambda: 1.0) == 8.0
    assert backoff.countdown(20, rand=lambda: 0.0) == 300.0
    assert backoff.countdown(20, rand=lambda: 1.0) == 600.0


@given(
    factor=st.floats(min_value=1e-3, max_value=1e6),
    maximum=st.floats(min_value=1e-3, max_value=1e7),
    retries=st.integers(0, 200),
    draw=st.floats(0.0, 1.0),
)
def test_jitter_stays_within_half_and_full_countdown(factor: float, maximum: float, retries: int, draw: float) -> None:
    base = Backoff(factor, maximum, jitter=False).countdown(retries)
    jittered = Backoff(factor, maximum, jitter=True).countdown(retries, rand=lambda: draw)
    assert 0 < base / 2 <= jittered <= base <= maximum


def test_default_jitter_uses_random_and_never_hits_zero() -> None:
    backoff = Backoff()
    values = [backoff.countdown(0) for _ in range(1000)]
    assert all(0.5 <= v <= 1.0 for v in values)
    assert len(set(values)) > 1


def test_total() -> None:
    assert Backoff(factor=1.0, maximum=600.0).total(3) == 1 + 2 + 4
    assert Backoff(factor=1.0, maximum=600.0).total(0) == 0
    assert Backoff(factor=1.0, maximum=5.0).total(5) == 1 + 2 + 4 + 5 + 5
    assert Backoff(factor=None, maximum=600.0).total(4) == 4.0
    # Jitter never makes a countdown longer, so total() bounds every jittered schedule.
    jittered = Backoff(factor=1.0, maximum=600.0, jitter=True)
    assert sum(jittered.countdown(n, rand=lambda: 1.0) for n in range(12)) == jittered.total(12)


# -- outages: the target's fault, not the op's ------------------------------------------------

OUTAGE_REPLIES = RETRYABLE_REPLIES[:5]  # LOADING, READONLY, TRYAGAIN, CLUSTERDOWN, MASTERDOWN
OWN_RETRYABLE_REPLIES = RETRYABLE_REPLIES[5:]  # BUSY, OOM, NOREPLICAS: what the op asks


@pytest.mark.parametrize("text", OUTAGE_REPLIES)
def test_server_state_replies_are_outages(text: str) -> None:
    assert is_outage(reply(text))


@pytest.mark.parametrize("text", [*OWN_RETRYABLE_REPLIES, *PERMANENT_REPLIES])
def test_other_replies_are_not_outages(text: str) -> None:
    assert not is_outage(reply(text))


@pytest.mark.parametrize("exc", [
    rex.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."),
    rex.TimeoutError("Timeout reading from socket"),
    rex.AuthenticationError("invalid username-password pair"),
    ConnectionResetError(104, "Connection reset by peer"),
    TimeoutError("timed out"),
])
def test_connection_level_errors_are_outages(exc: BaseException) -> None:
    assert is_outage(exc)


def test_a_pool_out_of_connections_is_not_an_outage() -> None:
    exc = rex.MaxConnectionsError("Too many connections")
    assert is_retryable(exc)
    assert not is_outage(exc)
