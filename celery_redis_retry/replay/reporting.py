"""What a replay reports once an op reached its target: a log line, its latency, its span.

Every op whose replay ran on its target (applied, duplicate or superseded) goes through
:func:`report_outcome`, from the single and the batch task alike.
"""

from __future__ import annotations

import logging
import time

from celery_redis_retry.logs import op_fields
from celery_redis_retry.metrics import observe_latency
from celery_redis_retry.ops import RedisOp
from celery_redis_retry.tracing import record_replay

#: The tasks' logger: operators filter on it.
logger = logging.getLogger("celery_redis_retry.replay.tasks")


def report_outcome(op: RedisOp, outcome: str, started_ns: int | None = None) -> None:
    """Log ``op``'s outcome (with its fields), count its capture-to-outcome time and record
    its replay in its trace (see :mod:`celery_redis_retry.tracing`)."""
    observe_latency(time.time() - op.created_at)
    record_replay(op, outcome, started_ns)
    if outcome == "duplicate":
        logger.info("op %s was already applied (dedupe marker found)", op.id, extra=op_fields(op, outcome))
    elif outcome == "superseded":
        why = f"its {op.guard.kind} guard failed" if op.guard else "a newer write is stamped on its keys"
        logger.info("op %s superseded: %s, the newer write stays; nothing written", op.id, why,
                    extra=op_fields(op, outcome))
    elif logger.isEnabledFor(logging.DEBUG):  # every applied op passes here: no fields unless logged
        logger.debug("op %s %s", op.id, outcome, extra=op_fields(op, outcome))
