"""W3C trace context across the outage: a replay shows up in the trace of the write it replays.

When the application has OpenTelemetry (``pip install 'celery-redis-retry[otel]'``, and a
tracer provider configured as the application does for its own spans), a captured op
carries the ``traceparent`` of the span that was current when it was published, in its
context (``op.context["traceparent"]``, W3C Trace Context). The worker that replays it
records one span, ``celery_redis_retry.replay``, as a child of that span, with the op's id,
target, attempt and outcome as attributes, so the trace of the request whose write
failed shows when (and whether) the write finally happened. Its JSON log lines carry the
trace id too (:mod:`celery_redis_retry.logs`).

Without OpenTelemetry nothing is added and nothing is recorded: one module-level check.
"""

from __future__ import annotations

import importlib.util
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery_redis_retry.ops import RedisOp

#: Whether OpenTelemetry's API is importable here (checked once).
AVAILABLE = importlib.util.find_spec("opentelemetry") is not None
SPAN_NAME = "celery_redis_retry.replay"
_propagator: Any = None


def _w3c() -> Any:
    global _propagator
    if _propagator is None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        _propagator = TraceContextTextMapPropagator()
    return _propagator


def with_trace(op: RedisOp) -> RedisOp:
    """``op`` carrying the current span's ``traceparent``, if there is one and it has none."""
    if not AVAILABLE or "traceparent" in op.context:
        return op
    carrier: dict[str, str] = {}
    _w3c().inject(carrier)
    parent = carrier.get("traceparent")
    return op if parent is None else op.with_context(traceparent=parent)


def trace_id_of(op: RedisOp) -> str | None:
    """The op's trace id: the one the application gave, else its ``traceparent``'s."""
    given = op.context.get("trace_id")
    if given is not None:
        return given
    parent = op.context.get("traceparent")
    if parent is None:
        return None
    parts = parent.split("-")
    return parts[1] if len(parts) == 4 else None


def record_replay(op: RedisOp, outcome: str, started_ns: int | None = None) -> None:
    """Record the replay of ``op`` as a span under its ``traceparent`` (nothing without one)."""
    parent = op.context.get("traceparent") if AVAILABLE else None
    if parent is None:
        return
    from opentelemetry import trace

    tracer = trace.get_tracer("celery_redis_retry")
    span = tracer.start_span(
        SPAN_NAME, context=_w3c().extract({"traceparent": parent}), kind=trace.SpanKind.CONSUMER,
        start_time=started_ns,
        attributes={"crr.op_id": op.id, "crr.target": op.target, "crr.outcome": outcome, "crr.attempt": op.attempt,
                    "db.system": "redis", "crr.captured_at": op.created_at},
    )
    span.end(end_time=time.time_ns())
