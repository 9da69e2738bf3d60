"""Circuits as one process sees them (pure: a probe function stands in for the target), and parked headers.

The end-to-end proof, against real redis-server, Sentinel, bridge and worker processes,
is in test_outages.py.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
import redis.exceptions as rex

from celery_redis_retry import ops
from celery_redis_retry.bridge.circuits import CLOSED, OPEN, RECOVERING, Circuits, CircuitState, LocalCircuit
from celery_redis_retry.bridge.waiting import ParkedHeaders
from celery_redis_retry.config import Settings
from celery_redis_retry.errors import ConfigurationError
from celery_redis_retry.expiry import expired
from celery_redis_retry.kafka.topics import plan
from celery_redis_retry.replay.outcomes import ReplayResult


class Target:
    """A probe whose answer the test sets."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.probes = 0

    def __call__(self, name: str) -> None:
        self.probes += 1
        if self.error is not None:
            raise self.error


def wait_for_state(circuits: Circuits, target: str, state: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while circuits.state(target) != state:
        assert time.monotonic() < deadline, f"{target} still {circuits.state(target)}, not {state}"
        time.sleep(0.01)


def test_an_outage_opens_the_circuit_and_a_good_probe_recovers_it() -> None:
    target, changes = Target(), []
    circuits = Circuits(["default"], target, recovery_rate=100, on_change=changes.append)
    target.error = rex.ConnectionError("Connection refused")
    circuits.start()
    try:
        assert circuits.state("default") == OPEN  # the first probe runs before start() returns
        assert circuits.admit("default", 10) == 0
        assert circuits.reason("default") == "ConnectionError: Connection refused"
        target.error = None
        wait_for_state(circuits, "default", RECOVERING)
    finally:
        circuits.stop()
    assert [(c.target, c.state) for c in changes] == [("default", OPEN), ("default", RECOVERING)]
    assert isinstance(changes[0], CircuitState)
    assert changes[0].opened == 1


def test_a_probe_error_that_is_no_outage_changes_nothing() -> None:
    target = Target()
    target.error = rex.ResponseError("NOPERM this user has no permissions to run the 'ping' command")
    circuits = Circuits(["default"], target, recovery_rate=100)
    circuits.start()
    try:
        assert circuits.state("default") == CLOSED
        assert circuits.admit("default", 7) == 7
    finally:
        circuits.stop()


def test_suspect_probes_at_once() -> None:
    target = Target()
    circuits = Circuits(["default"], target, recovery_rate=100)
    circuits.start()
    try:
        probes = target.probes
        target.error = rex.TimeoutError("Timeout connecting")
        circuits.suspect("default")
        wait_for_state(circuits, "default", OPEN, timeout=0.5)  # well before the 1 s interval
        assert target.probes > probes
    finally:
        circuits.stop()


def test_recovery_admits_a_rate_that_doubles_every_second() -> None:
    circuits = Circuits(["default"], Target(), recovery_rate=1000)
    circuit = circuits._circuits["default"]
    circuit.state = RECOVERING
    circuit.changed = time.monotonic()
    first = circuits.admit("default", 100_000)
    assert 1000 <= first <= 1100  # one second's worth at once, not the whole backlog
    assert circuits.admit("default", 100_000) < 50  # used up: the next ones wait
    circuit.changed -= 3.0  # three seconds into the recovery
    third = circuits.admit("default", 100_000)
    assert 9000 <= third <= 11_500  # 1000 + 1000 * (2**3 - 1) / ln 2 = 11,099, minus what went before
    circuit.changed -= 10.0  # past the recovery: everything goes
    assert circuits.admit("default", 100_000) == 100_000


def test_an_unknown_target_is_always_closed() -> None:
    circuits = Circuits(["default"], Target(), recovery_rate=10)
    assert circuits.state("other") == CLOSED
    assert circuits.admit("other", 3) == 3


def test_a_worker_skips_a_target_for_a_moment_after_an_outage() -> None:
    local = LocalCircuit(hold=0.05)
    assert not local.is_open("default")
    local.opened("default")
    assert local.is_open("default")
    assert not local.is_open("sessions")
    time.sleep(0.06)
    assert not local.is_open("default")  # the next op tries again


def test_parked_headers_are_read_leniently() -> None:
    headers = [("crr-not-before", b"1700000000.5"), ("crr-origin-topic", b"ops"), ("crr-origin-partition", b"3"),
               ("crr-origin-offset", b"41"), ("other", None)]
    assert ParkedHeaders.read(headers) == ParkedHeaders(1700000000.5, ("ops", 3, 41))
    assert ParkedHeaders.read(None) == ParkedHeaders()
    assert ParkedHeaders.read([("crr-not-before", b"soon"), ("crr-origin-topic", b"ops")]) == ParkedHeaders()


def test_max_age_expires_an_op_without_a_deadline() -> None:
    op = ops.set("k", "v")
    assert expired(op, op.created_at + 10, max_age=60) is None
    why = expired(op, op.created_at + 61, max_age=60)
    assert why is not None
    assert why.startswith("older than redis_retry_max_age (60 s)")
    assert expired(op, op.created_at + 10**9, max_age=0) is None  # 0: no limit
    assert expired(op.with_deadline(5), op.created_at + 6, max_age=60) == "deadline passed 1.000 s ago"


BASE = {"redis_retry_kafka": {"bootstrap.servers": "127.0.0.1:1"}, "redis_retry_targets": {"default": "redis://x"}}


def test_each_target_has_a_waiting_topic_and_topics_create_plans_it() -> None:
    settings = Settings.from_mapping({**BASE, "redis_retry_targets": {"default": "redis://a", "sessions": "redis://b"}})
    assert settings.waiting_topics == {"default": "redis-retry-queue.waiting.default",
                                       "sessions": "redis-retry-queue.waiting.sessions"}
    assert settings.target_of_waiting_topic("redis-retry-queue.waiting.sessions") == "sessions"
    assert settings.target_of_waiting_topic("redis-retry-queue.waiting.unknown") is None
    assert settings.target_of_waiting_topic("redis-retry-queue") is None
    planned = {p.name: p for p in plan(settings, partitions=6)}
    waiting = planned["redis-retry-queue.waiting.sessions"]
    assert waiting.partitions == 6
    assert waiting.config["retention.ms"] == planned["redis-retry-queue"].config["retention.ms"]


def test_a_long_max_age_lengthens_the_planned_retention() -> None:
    settings = Settings.from_mapping({**BASE, "redis_retry_max_age": 10 * 86400})
    retention = int(plan(settings)[0].config["retention.ms"])
    assert retention == (10 + 3) * 86400 * 1000  # max age plus the margin


@pytest.mark.parametrize("name", ["has space", "slash/name", "x" * 101])
def test_a_target_name_must_fit_in_a_topic_name(name: str) -> None:
    with pytest.raises(ConfigurationError, match="redis_retry_targets name"):
        Settings.from_mapping({**BASE, "redis_retry_targets": {"default": "redis://x", name: "redis://y"}})


@pytest.mark.parametrize(("key", "value"), [("redis_retry_max_age", -1), ("redis_retry_max_countdown_tasks", 0),
                                            ("redis_retry_recovery_rate", 0)])
def test_outage_settings_are_checked(key: str, value: int) -> None:
    with pytest.raises(ConfigurationError, match=key):
        Settings.from_mapping({**BASE, key: value})


class _FlakyExecutor:
    """Fails its first round trip with an outage, then applies everything."""

    def __init__(self) -> None:
        self.calls = 0

    def run_many(self, batch: list[ops.RedisOp]) -> list[ReplayResult]:
        self.calls += 1
        if self.calls == 1:
            raise rex.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        return [ReplayResult("applied", (1,)) for _ in batch]


class _ParkingRuntime:
    """What a worker's batch step uses of its runtime: the circuit, the executor, parking."""

    def __init__(self, hold: float) -> None:
        self.circuit = LocalCircuit(hold=hold)
        self.executor = _FlakyExecutor()
        self.parked = 0

    def park(self, items: list[object], reason: str) -> bool:
        self.parked += len(items)
        return True


def test_ops_a_worker_parks_untried_do_not_extend_its_hold_on_the_target() -> None:
    # Under a steady flow a batch arrives while the hold lasts; if parking it untried
    # renewed the hold, the target would never be tried again (found by the chaos run).
    from celery_redis_retry.replay.tasks import _run_target

    rt = _ParkingRuntime(hold=0.3)
    outcomes: Counter[str] = Counter()
    began = time.monotonic()
    while outcomes["applied"] == 0 and time.monotonic() - began < 2.0:
        op = ops.incrby("n", 1)
        _run_target(rt, "default", [("message", ["ops", 0, 1], op, ("ops", 0, 1))],  # type: ignore[arg-type]
                    outcomes=outcomes, ended=[], retry_later=[], done=[])
        time.sleep(0.05)
    took = time.monotonic() - began
    assert outcomes["applied"] == 1, f"the target was never tried again ({outcomes})"
    assert rt.executor.calls == 2, "ops parked during the hold were tried"
    assert 0.3 <= took < 0.6, f"tried again after {took:.2f}s, the hold is 0.3 s"
    assert rt.parked == outcomes["waiting"] >= 5
