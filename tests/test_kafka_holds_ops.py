"""Kafka keeps every op until it has ended: what the Celery broker loses is handed over again.

Real processes throughout: the bridge and a ``celery worker`` as subprocesses, a Redis
Celery broker that is purged, flushed or SIGKILLed mid-drain, the embedded Kafka broker.
Every op is an INCRBY: one lost shows as a counter short, one applied twice as a counter
over. The bridge hands over again what has not ended after ``REDELIVERY`` seconds.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from typing import Any

import pytest
from loop_stack import LoopStack

from celery_redis_retry import ops
from celery_redis_retry.testing import CeleryCommand

pytestmark = pytest.mark.slow

REDELIVERY = 8.0
COUNTERS = 200


def counter_ops(count: int, seed: int) -> tuple[list[Any], dict[str, int]]:
    rng = random.Random(seed)
    built, sums = [], {}
    for _ in range(count):
        key, amount = f"counter:{rng.randrange(COUNTERS)}", rng.randrange(1, 1000)
        built.append(ops.incrby(key, amount))
        sums[key] = sums.get(key, 0) + amount
    return built, sums


def applied(stack: LoopStack, sums: dict[str, int]) -> int:
    """How much of the expected sum the counters hold."""
    with stack.client() as r:
        return sum(int(v or 0) for v in r.mget(list(sums)))


def assert_exact(
    stack: LoopStack, sums: dict[str, int], timeout: float, supervise: Callable[[], None] = lambda: None
) -> None:
    """Wait until the counters hold their sums (calling ``supervise`` at each look), then check none goes over."""
    total = sum(sums.values())

    def done() -> bool:
        supervise()
        return applied(stack, sums) >= total

    stack.wait_for(done, timeout, "every counter at its sum")
    time.sleep(2 * REDELIVERY)  # anything handed over again ends duplicate, never moves a counter
    with stack.client() as r:
        wrong = {k: (int(r.get(k) or 0), v) for k, v in sums.items() if int(r.get(k) or 0) != v}
    assert not wrong, f"counters off their sums (held, expected): {list(wrong.items())[:10]}"
    assert stack.dlq_is_empty()


def queued(stack: LoopStack) -> int:
    assert stack.broker is not None
    with stack.broker.client() as broker:
        return int(broker.llen(f"queue-{stack.name}"))


def mid_drain(
    make_loop: Callable[..., LoopStack], seed: int, concurrency: int = 1, **options: Any
) -> tuple[LoopStack, dict[str, int], CeleryCommand]:
    """A stack draining 5,000 INCRBY in tasks of 20, once a fifth of the sum is applied."""
    stack = make_loop(extra_env={"CRR_REDELIVERY_TIMEOUT": str(REDELIVERY), "CRR_HIGH_WATER": "10000"}, **options)
    built, sums = counter_ops(5_000, seed=seed)
    stack.publish_all(built)
    stack.start_worker(concurrency=concurrency)
    bridge = stack.start_bridge("--batch-size", "20")
    total = sum(sums.values())
    stack.wait_for(lambda: applied(stack, sums) >= total // 5, 120, "a fifth of the drain applied")
    return stack, sums, bridge


def test_a_purge_of_the_replay_queue_mid_drain_loses_no_op(make_loop: Callable[..., LoopStack]) -> None:
    stack, sums, bridge = mid_drain(make_loop, seed=3)
    assert stack.worker is not None
    stack.worker.stop(timeout=60)  # gives back what it held: the purge below takes it
    stack.wait_for(lambda: queued(stack) > 0, 30, "tasks waiting in the Celery queue")
    purged = stack.cli("purge", "-f", "-Q", f"queue-{stack.name}")
    assert purged.returncode == 0, purged.stdout + purged.stderr
    count = int(re.search(r"Purged (\d+) message", purged.stdout).group(1))  # type: ignore[union-attr]
    assert count > 0, purged.stdout
    print(f"\npurged {count} tasks of the replay queue mid-drain")
    stack.start_worker(concurrency=2)
    assert_exact(stack, sums, 180)
    assert bridge.log_text().count("handing them over again") > 0


def test_a_flushall_of_the_celery_broker_mid_drain_loses_no_op(make_loop: Callable[..., LoopStack]) -> None:
    stack, sums, bridge = mid_drain(make_loop, seed=4)
    assert stack.broker is not None
    with stack.broker.client() as broker:
        before = int(broker.dbsize())
        broker.flushall()
    print(f"\nFLUSHALL of the Celery broker mid-drain ({before} keys)")
    assert_exact(stack, sums, 180)
    assert bridge.log_text().count("handing them over again") > 0


@pytest.mark.extended  # the chaos run plays this fault with full accounting in make test
def test_a_celery_broker_sigkilled_with_appendfsync_everysec_loses_no_op(
    make_loop: Callable[..., LoopStack],
) -> None:
    stack, sums, _ = mid_drain(make_loop, seed=5, concurrency=2, broker_args=("--appendfsync", "everysec"))
    assert stack.broker is not None
    stack.broker.kill()
    time.sleep(2.0)
    stack.broker.start()
    print("\nCelery broker SIGKILLed mid-drain and restarted from its append-only file")
    # kombu's Redis transport can end the worker when the broker dies under it
    # ("Unrecoverable error: AttributeError ... 'hostname'" while restoring unacked
    # messages), and its shutdown then takes up to half a minute: a supervisor starts it
    # again whenever it is gone, as systemd's Restart=always does.
    restarts: list[float] = []

    def supervise() -> None:
        if stack.worker is not None and not stack.worker.running:
            restarts.append(time.monotonic())
            stack.start_worker(concurrency=2)

    assert_exact(stack, sums, 240, supervise=supervise)
    print(f"the worker exited with the broker {len(restarts)} time(s) and was started again, as a supervisor would")

