"""A replay never overwrites a newer write, and a write whose reply was lost is never applied twice.

Real processes at the library's default settings: a target redis-server (or a 3-master
Redis Cluster) that is killed and restarted, the bridge, a Celery worker, and the
application writing through ``celery_redis_retry.wrap()`` in this process or in writer
processes of its own (``tests/apps/newer_writes.py``).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest
import redis
from loop_stack import APPS_DIR, LoopStack
from newer_writes import SUPERSEDED_KINDS, WRITES, before_outage, fast_client, write, wrong_keys
from redis.backoff import NoBackoff
from redis.retry import Retry
from test_outages import DEFAULTS

import celery_redis_retry
from celery_redis_retry.ops import RedisOp
from celery_redis_retry.testing import RedisCluster, RedisServer

pytestmark = pytest.mark.slow

# Every acknowledged write reaches the disk before its reply: a killed target loses none.
DURABLE = ("--appendfsync", "always")


def _restart(target: RedisServer | RedisCluster) -> None:
    nodes = target.nodes if isinstance(target, RedisCluster) else [target]
    for node in nodes:
        node.start()
    if isinstance(target, RedisCluster):
        from celery_redis_retry.testing import wait_until

        def cluster_ok() -> bool:
            for node in nodes:
                with node.client() as client:
                    if "cluster_state:ok" not in client.execute_command("CLUSTER", "INFO").decode():
                        return False
            return True

        wait_until(cluster_ok, 30, interval=0.2, what="the cluster to report cluster_state:ok")


def _kill(target: RedisServer | RedisCluster) -> None:
    for node in target.nodes if isinstance(target, RedisCluster) else [target]:
        node.kill()


def _writer(stack: LoopStack, phase: str, count: int) -> dict[str, int]:
    """Run the ``phase`` writes in a writer process of their own."""
    done = subprocess.run(  # noqa: PLW1510 - the return code is asserted, with the writer's stderr
        [sys.executable, str(APPS_DIR / "newer_writes.py"), phase, str(count)],
        env={**os.environ, **stack.env_for("app")}, cwd=str(APPS_DIR), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("target", "processes"), [("single", 1), ("single", 2), ("cluster", 2)], ids=["one-process", "two-processes",
                                                                                   "cluster-two-processes"]
)
def test_a_replay_never_overwrites_the_apps_newer_write(
    make_loop: Callable[..., LoopStack], target: str, processes: int
) -> None:
    count = 1000
    stack = make_loop(cluster=target == "cluster", target_args=DURABLE if target == "single" else (), **DEFAULTS)
    assert isinstance(stack.target, (RedisServer, RedisCluster))
    url = stack.settings().targets["default"]
    with stack.client() as r:
        before_outage(r, count)
    captured: list[RedisOp] = []
    wrapped = celery_redis_retry.wrap(fast_client(url), producer=stack.producer, on_capture=captured.append)

    _kill(stack.target)
    started = time.monotonic()
    calls = write(wrapped, "captured", count)
    capture_s = time.monotonic() - started
    assert len(captured) == calls == len(WRITES) * count, "every write made during the outage was captured"
    assert stack.producer.flush(30) == 0
    assert all(op.error is not None for op in captured)
    _restart(stack.target)

    # The app writes every key again at once; the backlog is replayed after that.
    if processes == 1:
        assert write(wrapped, "newer", count) == calls
        assert len(captured) == calls, "a write made after recovery was captured"
    else:
        newer = _writer(stack, "newer", count)
        assert newer == {"calls": calls, "captured": 0, "unflushed": 0}
    stack.start_worker(concurrency=2)
    bridge = stack.start_bridge()
    stack.wait_assigned(bridge)
    replay_started = time.monotonic()

    superseded = len(SUPERSEDED_KINDS) * count
    stack.wait_for(lambda: stack.worker_log_count(r"op \S+ superseded") >= superseded, 180,
                   f"{superseded} replays superseded")
    with stack.client() as r:
        stack.wait_for(lambda: not wrong_keys(r, count)["incrby"], 60, "every counter at its exact sum")
        drained = time.monotonic() - replay_started
        time.sleep(3)  # a late second apply, or a late overwrite, would land now
        wrong = wrong_keys(r, count)
    assert {kind: keys[:5] for kind, keys in wrong.items() if keys} == {}
    assert stack.worker_log_count(r"op \S+ superseded") == superseded
    assert stack.dlq_is_empty(), "a replay died"
    print(f"\n{target}, {processes} process(es): {calls} writes captured in {capture_s:.2f} s, the newer writes "
          f"made, backlog replayed in {drained:.1f} s: {superseded} superseded, {count} counters applied, "
          f"0 of {calls} keys wrong")


def test_a_race_of_hot_writes_through_an_outage_ends_at_the_apps_last_write(
    make_loop: Callable[..., LoopStack],
) -> None:
    """100 hot keys written at 500 writes/s for 5 s, through a 10 s outage and 15 s after,
    while the replays drain concurrently: every key ends at the app's last write."""
    stack = make_loop(target_args=DURABLE, **DEFAULTS)
    assert isinstance(stack.target, RedisServer)
    stack.start_worker(concurrency=2)
    bridge = stack.start_bridge()
    stack.wait_assigned(bridge)
    captured: list[RedisOp] = []
    wrapped = celery_redis_retry.wrap(fast_client(stack.target.url), producer=stack.producer,
                                      on_capture=captured.append)
    keys = [f"hot:{k}" for k in range(100)]
    last: dict[str, int] = {}  # the ledger: the last value the app wrote to each key
    increments: dict[str, int] = {}
    rng = random.Random(12)
    rate, before, outage, after = 500, 5.0, 10.0, 15.0
    started = time.monotonic()
    n = 0
    killed = restarted = False
    while (elapsed := time.monotonic() - started) < before + outage + after:
        if not killed and elapsed >= before:
            stack.target.kill()
            killed = True
        if killed and not restarted and elapsed >= before + outage:
            threading.Thread(target=stack.target.start, daemon=True).start()  # the app keeps writing meanwhile
            restarted = True
        key = rng.choice(keys)
        if n % 2:
            wrapped.set(key, n)
            last[key] = n
        else:
            wrapped.incrby(f"{key}:n", 1)
            increments[key] = increments.get(key, 0) + 1
        n += 1
        time.sleep(max(0.0, started + n / rate - time.monotonic()))
    assert stack.producer.flush(30) == 0
    ended = len(captured)
    assert ended > 0.9 * rate * outage, f"only {ended} writes captured over a {outage:.0f} s outage"

    with stack.client() as r:
        def settled() -> bool:
            values = r.mget(keys)
            counts = r.mget([f"{k}:n" for k in keys])
            return all(v == str(last[k]).encode() for k, v in zip(keys, values, strict=True) if k in last) and all(
                int(c or 0) == increments.get(k, 0) for k, c in zip(keys, counts, strict=True)
            )

        stack.wait_for(settled, 120, "every hot key at the app's last write, every counter at its sum")
        time.sleep(5)  # replays still in flight would land now
        values = dict(zip(keys, r.mget(keys), strict=True))
        counts = dict(zip(keys, r.mget([f"{k}:n" for k in keys]), strict=True))
    wrong = [k for k in last if values[k] != str(last[k]).encode()]
    miscounted = [k for k in keys if int(counts[k] or 0) != increments.get(k, 0)]
    assert wrong == []
    assert miscounted == []
    assert stack.dlq_is_empty()
    superseded = stack.worker_log_count(r"op \S+ superseded")
    print(f"\nrace: {n} writes at {rate}/s, {ended} captured over the {outage:.0f} s outage, replayed while the app "
          f"kept writing: 0 of {len(last)} hot keys off the app's last write, 0 of {len(increments)} counters off "
          f"their sum; {superseded} replays superseded")


def test_an_incrby_applied_whose_reply_was_lost_moves_the_counter_once(make_loop: Callable[..., LoopStack]) -> None:
    stack = make_loop(target_args=("--enable-debug-command", "local"), **DEFAULTS)
    assert isinstance(stack.target, RedisServer)
    port = stack.target.port

    def stall(seconds: float) -> threading.Thread:
        # Another client makes the server sleep: commands sent meanwhile run after it.
        def sleep() -> None:
            with stack.target.client() as other:
                other.execute_command("DEBUG", "SLEEP", seconds)

        thread = threading.Thread(target=sleep)
        thread.start()
        time.sleep(0.2)
        return thread

    captured: list[RedisOp] = []
    wrapped = celery_redis_retry.wrap(
        redis.Redis(port=port, socket_timeout=0.5, retry=Retry(NoBackoff(), 0)),
        producer=stack.producer, on_capture=captured.append,
    )
    with stack.client() as r:
        r.set("counter", 10)
        assert wrapped.incrby("warm-up", 1) == 1  # the app has written before: the server has the script
        sleeping = stall(1.5)
        assert wrapped.incrby("counter", 5) is None  # timed out: captured
        sleeping.join()
        assert r.get("counter") == b"15", "Redis applied it after all"
        assert len(captured) == 1
        assert captured[0].error is not None
        assert captured[0].error.outcome_unknown

        # redis-py's own retries of a timed-out write: the same op id, so one apply.
        retrying = celery_redis_retry.wrap(
            redis.Redis(port=port, socket_timeout=0.5, retry=Retry(NoBackoff(), 5)), producer=stack.producer,
            on_capture=captured.append,
        )
        sleeping = stall(1.5)
        assert retrying.incrby("counter", 100) == 115, "the retry got the reply of the one run"
        sleeping.join()
        assert r.get("counter") == b"115"
        assert len(captured) == 1

        assert stack.producer.flush(30) == 0
        stack.start_worker(concurrency=2)
        bridge = stack.start_bridge()
        stack.wait_assigned(bridge)
        op_id = captured[0].id
        stack.wait_for(lambda: stack.worker_log_count(rf"op {op_id} was already applied") == 1, 60,
                       "the replay to find the write's marker")
        time.sleep(2)
        assert r.get("counter") == b"115", "the counter moved once per INCRBY"
    assert stack.dlq_is_empty()
    print("\nINCRBY whose reply was lost (socket_timeout 0.5 s < DEBUG SLEEP 1.5 s): applied once by Redis, replay "
          "ended duplicate; with redis-py's 5 retries the call returned the one run's reply; counter 10 -> 15 -> 115")
