"""Log lines for people by default, or one JSON object per line for a log pipeline.

``redis_retry_log_format = "json"`` (the workers: see ``replay/worker.py``) or
``redis-retry bridge --log-format json`` (the bridge) writes each record as::

    {"ts": "2026-12-04T20:16:08.123Z", "level": "INFO", "logger": "celery_redis_retry.replay.tasks",
     "process": "ForkPoolWorker-1", "message": "op 4f1c...-1a was already applied (dedupe marker found)",
     "op_id": "4f1c...-1a", "trace_id": "5b8e...", "user_uuid": "...", "device_id": "...",
     "source": "UserRepo.save", "target": "default", "outcome": "duplicate", "task_id": "..."}

The op fields come from the log calls about one op (``extra=op_fields(op, outcome)``): its
id, the trace, user and device ids and source the application gave it
(:meth:`~celery_redis_retry.ops.RedisOp.with_context`), its target and outcome. A field
with no value is left out.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery_redis_retry.ops import RedisOp

FORMATS = ("text", "json")
#: Fields a record about one op may carry, in the order they are written.
OP_FIELDS = ("op_id", "trace_id", "user_uuid", "device_id", "source", "target", "outcome")
#: The op context keys copied into log records.
_CONTEXT_FIELDS = ("user_uuid", "device_id")


def op_fields(op: RedisOp, outcome: str | None = None) -> dict[str, Any]:
    """The ``extra`` of a log call about ``op``: what a log pipeline finds the op by."""
    from celery_redis_retry.tracing import trace_id_of

    fields: dict[str, Any] = {"op_id": op.id}
    trace_id = trace_id_of(op)  # given by the application, or its traceparent's
    if trace_id is not None:
        fields["trace_id"] = trace_id
    for key in _CONTEXT_FIELDS:
        value = op.context.get(key)
        if value is not None:
            fields[key] = value
    if op.source:
        fields["source"] = op.source
    fields["target"] = op.target
    if outcome is not None:
        fields["outcome"] = outcome
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, process, message, the op's fields."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        for field in OP_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                document[field] = value
        task_id = _current_task_id()
        if task_id is not None:
            document["task_id"] = task_id
        if record.exc_info:
            document["exc"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str)


def _current_task_id() -> str | None:
    try:
        from celery import current_task
    except ImportError:  # pragma: no cover - celery is a dependency
        return None
    request = getattr(current_task, "request", None) if current_task else None
    task_id = getattr(request, "id", None)
    return str(task_id) if task_id else None


def check_format(value: str, name: str) -> str:
    """``value`` if it is a log format; a clear error naming ``name`` otherwise."""
    if value not in FORMATS:
        from celery_redis_retry.errors import ConfigurationError

        raise ConfigurationError(f"{name} must be one of {', '.join(FORMATS)}, not {value!r}")
    return value


def use_format(log_format: str, logger: logging.Logger | None = None) -> None:
    """Give every handler of ``logger`` (the root logger by default) the formatter of ``log_format``."""
    if log_format != "json":
        return
    for handler in (logger or logging.getLogger()).handlers:
        handler.setFormatter(JsonFormatter())
