"""Operators' pauses: control records, the last one per target winning, read and followed from Kafka."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from celery_redis_retry import control
from celery_redis_retry.bridge.circuits import CLOSED, PAUSED, RECOVERING, Circuits, LocalCircuit
from celery_redis_retry.config import Settings
from celery_redis_retry.control import ControlWatch, TargetPause
from celery_redis_retry.errors import TargetPausedError, UnknownTargetNameError
from celery_redis_retry.testing import wait_until


def _settings(kafka: Any) -> Settings:
    return Settings.from_mapping({
        "redis_retry_kafka": dict(kafka.config),
        "redis_retry_targets": {"default": "redis://127.0.0.1:1/0", "sessions": "redis://127.0.0.1:1/1"},
        "redis_retry_topic": f"ops-{uuid.uuid4().hex[:10]}",
    })


def _record(target: str, paused: bool, by: str = "ops@host", reason: str = "") -> tuple[bytes, bytes]:
    return control.encode_pause(TargetPause(target, paused, by, reason, time.time()))


# -- pure ---------------------------------------------------------------------------------------


def test_the_last_record_per_target_wins_and_other_kinds_are_ignored() -> None:
    records: list[tuple[bytes | None, bytes | None]] = [
        _record("default", True, reason="failover"),
        _record("sessions", True, by="a@h1"),
        _record("default", False, by="b@h2"),
        (b"policy:default", b'{"anything": 1}'),  # another kind of control record
        (b"target:sessions", b"not json"),  # unreadable: ignored, the one before stands
        _record("default", True, by="c@h3", reason="maintenance"),
    ]
    latest = control.latest_pauses(records)
    assert set(latest) == {"default", "sessions"}
    assert (latest["default"].paused, latest["default"].by, latest["default"].reason) == (True, "c@h3", "maintenance")
    assert (latest["sessions"].paused, latest["sessions"].by) == (True, "a@h1")
    assert control.latest_pauses([*records, (b"target:default", None)]).keys() == {"sessions"}  # a tombstone


def test_the_default_control_topic_is_derived_from_the_topic_and_can_be_given() -> None:
    base = {"redis_retry_kafka": {"bootstrap.servers": "k:9092"}, "redis_retry_targets": {"default": "redis://r"}}
    assert Settings.from_mapping({**base, "redis_retry_topic": "orders"}).control_topic == "orders.control"
    given = Settings.from_mapping({**base, "redis_retry_control_topic": "ctl"})
    assert given.control_topic == "ctl"


def test_pausing_an_unknown_target_names_the_known_ones() -> None:
    settings = Settings.from_mapping({"redis_retry_kafka": {"bootstrap.servers": "127.0.0.1:1"},
                                      "redis_retry_targets": {"default": "redis://r", "sessions": "redis://s"}})
    for call in (lambda: control.pause(settings, "sesions", reason="typo"), lambda: control.resume(settings, "x")):
        with pytest.raises(UnknownTargetNameError, match=r"unknown target .*: redis_retry_targets names default, "
                                                          r"sessions"):
            call()


def test_a_paused_target_holds_its_circuit_and_resuming_ramps_up() -> None:
    changes: list[str] = []
    circuits = Circuits(["default", "other"], lambda _: None, recovery_rate=10,
                        on_change=lambda state: changes.append(f"{state.state}: {state.reason}"))
    circuits.set_pause(TargetPause("default", True, "ops@host", "failover", time.time()))
    assert (circuits.state("default"), circuits.admit("default", 5)) == (PAUSED, 0)
    assert circuits.holding("default")
    assert circuits.reason("default") == "paused by ops@host: failover"
    assert [c.state for c in circuits.snapshot()] == [PAUSED, CLOSED]
    assert circuits.admit("other", 5) == 5, "another target is not held"
    circuits.set_pause(TargetPause("default", True, "ops@host", "again", time.time()))  # no change: said once
    circuits.set_pause(TargetPause("default", False, "ops@host", "", time.time()))
    assert circuits.state("default") == RECOVERING
    assert 0 < circuits.admit("default", 1000) < 1000, "the ramp, not the whole backlog at once"
    assert changes == ["paused: paused by ops@host: failover", "recovering: "]


def test_a_worker_parks_ops_of_a_paused_target_untried() -> None:
    paused: dict[str, TargetPause] = {}
    local = LocalCircuit(hold=60, paused=paused.get)
    assert not local.is_open("default")
    paused["default"] = TargetPause("default", True, "ops@host", "failover", time.time())
    assert local.is_open("default")
    assert isinstance(local.skipped("default"), TargetPausedError)
    assert str(local.skipped("default")) == "target 'default' paused by ops@host: failover"
    del paused["default"]
    assert not local.is_open("default"), "a pause holds nothing once it ends"


# -- against the embedded Kafka --------------------------------------------------------------


@pytest.mark.slow
def test_read_pauses_reads_the_topic_to_its_end_last_record_wins(kafka: Any) -> None:
    settings = _settings(kafka)
    assert control.read_pauses(settings, timeout=10) == {}, "no control topic: nothing is paused"
    control.pause(settings, "default", reason="failover", by="a@h1")
    control.pause(settings, "sessions", by="a@h1")
    control.resume(settings, "default", by="b@h2")
    last = control.pause(settings, "default", reason="maintenance", by="c@h3")
    pauses = control.read_pauses(settings, timeout=10)
    assert pauses["default"] == last
    assert (pauses["sessions"].paused, pauses["sessions"].by) == (True, "a@h1")


@pytest.mark.slow
def test_a_pause_watch_follows_pauses_written_after_it_started(kafka: Any) -> None:
    settings = _settings(kafka)
    control.pause(settings, "sessions", reason="before", by="a@h1")
    seen: list[tuple[str, bool]] = []
    watch = ControlWatch(settings, on_change=lambda p: seen.append((p.target, p.paused))).start(wait=10)
    try:
        assert watch.is_paused("sessions"), "a pause written before the watch started"
        assert not watch.is_paused("default")
        control.pause(settings, "default", by="b@h2")
        wait_until(lambda: watch.is_paused("default"), 10, what="the new pause seen")
        control.resume(settings, "sessions")
        wait_until(lambda: not watch.is_paused("sessions"), 10, what="the resume seen")
        assert set(watch.snapshot()) == {"default", "sessions"}
        assert seen == [("sessions", True), ("default", True), ("sessions", False)]
    finally:
        watch.stop()


@pytest.mark.slow
def test_a_missing_control_topic_means_nothing_is_paused(
    apache_kafka: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    # Apache Kafka as production runs it creates no topic on use (the embedded broker and
    # Tansu create one on the first lookup).
    settings = _settings(apache_kafka)
    caplog.set_level("INFO", logger="celery_redis_retry.control")
    watch = ControlWatch(settings).start(wait=10)
    try:
        assert watch.wait_ready(0)
        assert not watch.is_paused("default")
        assert f"control topic {settings.control_topic} does not exist: no target is paused" in caplog.text
        with pytest.raises(control.kafka.TopicMissingError, match=settings.control_topic):
            control.pause(settings, "default")
    finally:
        watch.stop()
