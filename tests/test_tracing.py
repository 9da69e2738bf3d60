"""W3C trace context: a captured op carries its span's traceparent; its replay is a child span."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from loop_stack import LoopStack
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from celery_redis_retry import ops
from celery_redis_retry.logs import op_fields
from celery_redis_retry.tracing import SPAN_NAME, record_replay, with_trace

_exporter = InMemorySpanExporter()


@pytest.fixture(scope="module")
def tracer() -> trace.Tracer:
    """The process's tracer provider (set once: OpenTelemetry allows no second one), spans in memory."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_exporter))
        trace.set_tracer_provider(provider)
    return trace.get_tracer("tests")


def test_an_op_published_inside_a_span_carries_its_traceparent(tracer: trace.Tracer) -> None:
    assert "traceparent" not in with_trace(ops.set("k", "v")).context  # no span, nothing added
    with tracer.start_as_current_span("POST /profile") as span:
        op = with_trace(ops.set("k", "v"))
        context = span.get_span_context()
    assert op.context["traceparent"].startswith(f"00-{context.trace_id:032x}-{context.span_id:016x}-")
    assert op_fields(op)["trace_id"] == f"{context.trace_id:032x}"
    given = with_trace(op.with_context(trace_id="mine"))
    assert op_fields(given)["trace_id"] == "mine"  # the application's own id wins


def test_a_replay_is_recorded_as_a_child_of_the_capturing_span(tracer: trace.Tracer) -> None:
    _exporter.clear()
    with tracer.start_as_current_span("POST /profile") as span:
        op = with_trace(ops.incrby("n", 1))
        app_context = span.get_span_context()
    record_replay(op, "applied")
    record_replay(ops.incrby("untraced", 1), "applied")  # no traceparent: no span
    [replayed] = [s for s in _exporter.get_finished_spans() if s.name == SPAN_NAME]
    assert replayed.context.trace_id == app_context.trace_id
    assert replayed.parent is not None
    assert replayed.parent.span_id == app_context.span_id
    assert replayed.kind == trace.SpanKind.CONSUMER
    assert dict(replayed.attributes or {}) | {"crr.captured_at": 0} == {
        "crr.op_id": op.id, "crr.target": "default", "crr.outcome": "applied", "crr.attempt": 0,
        "db.system": "redis", "crr.captured_at": 0}


@pytest.mark.slow
def test_a_real_workers_replay_joins_the_apps_trace(
    make_loop: Callable[..., LoopStack], tracer: trace.Tracer, tmp_path: Path,
) -> None:
    spans_file = tmp_path / "spans.jsonl"
    stack = make_loop(extra_env={"CRR_SPANS_FILE": str(spans_file)})
    stack.start_worker(concurrency=2)
    bridge = stack.start_bridge()
    with tracer.start_as_current_span("POST /visits") as span:
        op = ops.incrby("visits", 1)
        stack.publish_all([op])  # what a wrapped client does when Redis is down
        app_context = span.get_span_context()
    stack.wait_assigned(bridge)

    def replay_span() -> dict[str, Any] | None:
        lines = spans_file.read_text().splitlines() if spans_file.exists() else []
        return next((s for s in map(json.loads, lines) if s["attributes"].get("crr.op_id") == op.id), None)

    found = stack.wait_for(replay_span, 60, "the worker's span of the replay")
    assert found["name"] == SPAN_NAME
    assert found["trace_id"] == f"{app_context.trace_id:032x}"
    assert found["parent_id"] == f"{app_context.span_id:016x}"
    assert found["attributes"]["crr.outcome"] == "applied"
