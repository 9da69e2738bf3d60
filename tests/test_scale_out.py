"""Several bridges in one consumer group: they share the partitions, and one takes over
the partitions of another that dies, losing nothing and applying nothing twice.

Real processes: the session's embedded Kafka, a target and a broker redis-server, a
``celery worker`` and two ``celery redis-retry bridge`` subprocesses.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import pytest
from loop_stack import KAFKA_EXTRA, LoopStack

from celery_redis_retry import ops

pytestmark = pytest.mark.slow

#: A rebalance on the mock cluster takes ~5 s with these, and more than 20 s with the
#: default max.poll.interval.ms (300 s).
REBALANCE_FAST = {**KAFKA_EXTRA, "max.poll.interval.ms": 10_000}


def _partitions(text: str, topic: str) -> set[int]:
    """Every partition of ``topic`` a bridge log says it was assigned."""
    found: set[int] = set()
    for line in re.findall(r"assigned (.*)", text):
        found.update(int(p) for p in re.findall(re.escape(topic) + r"\[(\d+)\]", line))
    return found


def test_two_bridges_share_the_group_and_one_takes_over_from_the_other(
    make_loop: Callable[..., LoopStack],
) -> None:
    stack = make_loop(extra_env={"CRR_KAFKA_EXTRA": json.dumps(REBALANCE_FAST), "CRR_HIGH_WATER": "6"})
    stack.publish_all([ops.set(f"warm-up:{i}", 1) for i in range(16)])  # the topic exists, 4 partitions
    first = stack.start_bridge("--batch-size", "50")
    stack.wait_assigned(first)
    second = stack.start_bridge("--batch-size", "50")
    stack.wait_for(lambda: _partitions(second.log_text(), stack.topic), 60, "the second bridge to get partitions")
    taken_by_second = _partitions(second.log_text(), stack.topic)
    assert taken_by_second < {0, 1, 2, 3}, "the second bridge should share the partitions, not take them all"

    # No worker yet: both bridges hand over a few batches, then stop reading (backpressure)
    # while they hold consumed ops. The first one dies there, without committing.
    count = 2000
    stack.publish_all([ops.incrby(f"n:{i}", 1) for i in range(count)])
    first.wait_for_log(r"reading paused", timeout=60)
    first.kill()
    stack.wait_for(lambda: _partitions(second.log_text(), stack.topic) == {0, 1, 2, 3}, 60,
                   "the second bridge to take over every partition")

    stack.start_worker(concurrency=2)
    with stack.client() as r:
        keys = [f"n:{i}" for i in range(count)]
        stack.wait_for(lambda: sum(v is not None for v in r.mget(keys)) == count, 180, "every op applied")
        values = r.mget(keys)
    assert values == [b"1"] * count, "each INCRBY applied exactly once"
    duplicates = stack.worker_log_count(r"was already applied")
    print(f"\nsecond bridge had partitions {sorted(taken_by_second)}, then all; duplicates caught: {duplicates}")
    assert stack.dlq_is_empty()
