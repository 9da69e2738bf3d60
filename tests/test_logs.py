"""JSON logs: one object per line, carrying the op's id, trace and origin, from the real processes."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
from loop_stack import LoopStack

from celery_redis_retry import ops
from celery_redis_retry.config import Settings
from celery_redis_retry.errors import ConfigurationError
from celery_redis_retry.logs import JsonFormatter, op_fields


def _json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_a_record_about_an_op_carries_its_fields() -> None:
    op = ops.incrby("n", 1).with_source("Counter.bump").with_context(trace_id="t-1", user_uuid="u-1")
    record = logging.LogRecord("celery_redis_retry.replay.tasks", logging.INFO, __file__, 1, "op %s done",
                               (op.id,), None)
    for key, value in op_fields(op, "applied").items():
        setattr(record, key, value)
    document = json.loads(JsonFormatter().format(record))
    assert document["message"] == f"op {op.id} done"
    assert {k: document[k] for k in ("level", "logger", "op_id", "trace_id", "user_uuid", "source", "target",
                                     "outcome")} == {
        "level": "INFO", "logger": "celery_redis_retry.replay.tasks", "op_id": op.id, "trace_id": "t-1",
        "user_uuid": "u-1", "source": "Counter.bump", "target": "default", "outcome": "applied"}
    assert "device_id" not in document  # no value, no field
    assert document["ts"].endswith("Z")


def test_an_unknown_log_format_is_refused_by_name() -> None:
    base = {"redis_retry_kafka": {"bootstrap.servers": "127.0.0.1:1"}, "redis_retry_targets": {"default": "redis://x"}}
    with pytest.raises(ConfigurationError, match="redis_retry_log_format must be one of text, json, not 'xml'"):
        Settings.from_mapping({**base, "redis_retry_log_format": "xml"})


@pytest.mark.slow
def test_json_logs_of_a_replay_carry_the_ops_trace_and_id(make_loop: Callable[..., LoopStack]) -> None:
    stack = make_loop(extra_env={"CRR_LOG_FORMAT": "json"})
    stack.start_worker(concurrency=1)
    bridge = stack.start_bridge("--log-format", "json")
    op = ops.incrby("visits", 1).with_source("Visits.count").with_context(
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736", user_uuid="u-42", device_id="d-7")
    stack.publish_all([op, op])  # the second copy finds the first one's dedupe marker
    stack.wait_assigned(bridge)

    def duplicate_line() -> dict[str, Any] | None:
        assert stack.worker is not None
        lines = _json_lines(stack.worker.log_text())
        return next((d for d in lines if d.get("op_id") == op.id and d.get("outcome") == "duplicate"), None)

    line = stack.wait_for(duplicate_line, 60, "the worker's JSON line about the duplicate")
    assert {k: line[k] for k in ("op_id", "trace_id", "user_uuid", "device_id", "source", "target")} == {
        "op_id": op.id, "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "user_uuid": "u-42", "device_id": "d-7",
        "source": "Visits.count", "target": "default"}
    assert line["message"] == f"op {op.id} was already applied (dedupe marker found)"
    assert line["logger"] == "celery_redis_retry.replay.tasks"
    assert line["task_id"]
    with stack.client() as r:
        assert r.get("visits") == b"1"

    # The bridge writes nothing but JSON objects (besides the test harness's own header).
    bridge_lines = [line for line in bridge.log_text().splitlines()
                    if line.strip() and not line.startswith("--- crr harness")]
    assert bridge_lines
    assert all(line.startswith("{") for line in bridge_lines), [x for x in bridge_lines if not x.startswith("{")]
    parsed = [json.loads(line) for line in bridge_lines]
    assert any("bridge consuming" in d["message"] for d in parsed)
