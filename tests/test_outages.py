"""An outage is not the op's fault: ops wait in Kafka while their target is down, and none dies of it.

Every test runs the real processes at the library's default retry settings
(``redis_retry_max_retries`` 3, backoff 1-2-4 s with jitter, batches of 1,000, a
Celery queue high-water mark of 500): a bridge, a Celery worker, redis-server targets
that are killed, restarted, failed over or made to load a dataset slowly. The figures
each test prints are the ones the docs quote (``docs/outages.md``).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from loop_stack import LoopStack, data_keys
from test_metrics import _scrape

from celery_redis_retry import ops
from celery_redis_retry.ops import RedisOp
from celery_redis_retry.testing import ManagedProcess, RedisServer, free_port, wait_until

pytestmark = pytest.mark.slow

#: The library's defaults, where the loop app's would differ (it retries faster for other tests).
DEFAULTS: dict[str, Any] = {
    "max_retries": 3,
    "backoff": 1.0,
    "backoff_max": 600.0,
    "extra_env": {"CRR_BATCH_SIZE": "1000", "CRR_HIGH_WATER": "500"},
}


# -- what the processes hold -------------------------------------------------------------------


def _rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants (a prefork worker's children too)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:
            continue
        found = re.search(r"VmRSS:\s+(\d+) kB", status)
        total += int(found.group(1)) if found else 0
    return total


@dataclass
class Samples:
    """Once a second: tasks workers hold unacknowledged, the Celery queue, bridge and worker memory."""

    held: list[int] = field(default_factory=list)
    queued: list[int] = field(default_factory=list)
    bridge_rss: list[int] = field(default_factory=list)
    worker_rss: list[int] = field(default_factory=list)


@contextmanager
def sampling(stack: LoopStack, bridge_pid: int) -> Iterator[Samples]:
    samples = Samples()
    stop = threading.Event()
    assert stack.broker is not None
    assert stack.worker is not None
    assert stack.worker.pid is not None
    broker, worker_pid, queue = stack.broker.client(), stack.worker.pid, f"queue-{stack.name}"

    def run() -> None:
        while not stop.wait(1.0):
            # kombu's Redis transport keeps every delivered, unacknowledged task (countdown
            # tasks included) in the "unacked" hash until the worker acks it.
            samples.held.append(int(broker.hlen("unacked")))
            samples.queued.append(int(broker.llen(queue)))
            samples.bridge_rss.append(_rss_kib(bridge_pid))
            samples.worker_rss.append(_rss_kib(worker_pid))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()
        broker.close()


def _flat(values: list[int], skip: int = 10) -> float:
    """The largest sample over the first one after ``skip`` seconds (warm-up): 1.0 is flat."""
    steady = values[skip:]
    return max(steady) / steady[0]


def _applied(r: redis.Redis, keys: list[str], expected: list[bytes]) -> bool:
    values: list[Any] = []
    for start in range(0, len(keys), 1000):
        values += r.mget(keys[start:start + 1000])
    return values == expected


# -- 1. a long outage, default settings --------------------------------------------------------


@pytest.mark.extended  # the chaos run's kill_target plays this fault with full accounting in make test
def test_a_120_s_outage_at_default_settings_kills_no_op(make_loop: Callable[..., LoopStack]) -> None:
    stack = make_loop(**DEFAULTS)
    stack.start_worker(concurrency=2)
    metrics_port = free_port()
    bridge = stack.start_bridge("--metrics-port", str(metrics_port))
    stack.wait_assigned(bridge)
    assert isinstance(stack.target, RedisServer)
    assert bridge.pid is not None

    count, outage = 5000, 120.0
    sets = [f"s:{i}" for i in range(count // 2)]
    counters = [f"n:{i}" for i in range(count // 2)]
    built: list[RedisOp] = [op for i in range(count // 2) for op in (ops.set(sets[i], i), ops.incrby(counters[i], 1))]

    stack.target.kill()  # the outage starts: nothing answers on the target's port
    started = time.monotonic()
    with sampling(stack, bridge.pid) as samples:
        for chunk in range(50):  # captured steadily through the outage, as failing writes would be
            stack.publish_all(built[chunk * 100:(chunk + 1) * 100])
            time.sleep(max(0.0, started + (chunk + 1) * 2.2 - time.monotonic()))
        # What an operator sees meanwhile: the status command, and the bridge's metrics.
        status = json.loads(stack.cli("redis-retry", "status", "--json").stdout)
        metrics = _scrape(metrics_port)
        time.sleep(max(0.0, started + outage - time.monotonic()))
        outage_samples = Samples(list(samples.held), list(samples.queued), list(samples.bridge_rss),
                                 list(samples.worker_rss))
        stack.target.start()
        recovered = time.monotonic()
        drain: list[tuple[float, int]] = []  # (seconds after recovery, ops applied): the ramp

        def all_applied() -> bool:
            found = sum(v is not None for start in range(0, count // 2, 1000)
                        for v in r.mget([*sets[start:start + 1000], *counters[start:start + 1000]]))
            drain.append((time.monotonic() - recovered, found))
            return found == count

        with stack.client() as r:
            stack.wait_for(all_applied, 120, f"all {count} ops applied")
            drained = time.monotonic() - recovered
            assert _applied(r, sets, [str(i).encode() for i in range(count // 2)])
            time.sleep(3)  # a late second apply would land now
            assert _applied(r, counters, [b"1"] * (count // 2)), "an op applied twice"

    assert stack.dlq_is_empty(), "an op died of the outage"
    assert stack.worker_log_count(r"retrying in") == 0, "an outage spent an attempt"
    assert stack.bridge_log_count(r"circuit open") == 1, "one line when the circuit opens, not one per op"
    parked = int(re.findall(r"(\d+) parked", bridge.log_text())[-1]) if "parked" in bridge.log_text() else None
    print(f"\n{count} ops over a {outage:.0f} s outage: 0 dead, all applied {drained:.1f} s after recovery; "
          f"most tasks held by the worker {max(outage_samples.held)}, longest Celery queue "
          f"{max(outage_samples.queued)}; bridge RSS {outage_samples.bridge_rss[10] // 1024}-"
          f"{max(outage_samples.bridge_rss[10:]) // 1024} MiB (x{_flat(outage_samples.bridge_rss):.3f}), worker RSS "
          f"{outage_samples.worker_rss[10] // 1024}-{max(outage_samples.worker_rss[10:]) // 1024} MiB "
          f"(x{_flat(outage_samples.worker_rss):.3f}); bridge report: {parked} parked")
    curve = ", ".join(f"{t:.1f} s: {n}" for t, n in drain if n)
    print(f"applied after recovery (the ramp from redis_retry_recovery_rate 2000 ops/s): {curve}")
    assert status["targets"]["default"]["circuit"] == "open"
    assert "Connection refused" in status["targets"]["default"]["reason"]
    assert status["targets"]["default"]["waiting"] == count
    assert metrics['crr_bridge_circuit_state{state="open",target="default"}'] == 1.0
    assert metrics['crr_bridge_circuit_state{state="closed",target="default"}'] == 0.0
    assert metrics['crr_bridge_circuit_opened_total{target="default"}'] == 1.0
    # The rest met the outage in the worker first.
    assert count - 200 <= metrics["crr_bridge_ops_parked_total"] <= count
    assert max(outage_samples.held) <= 10, "countdown tasks piled up in the worker during the outage"
    assert max(outage_samples.queued) <= 500
    assert _flat(outage_samples.bridge_rss) <= 1.10
    assert _flat(outage_samples.worker_rss) <= 1.10


# -- 2. a Sentinel failover at Sentinel's own default timing -------------------------------------


def test_a_sentinel_failover_at_its_default_30_s_kills_no_op(make_loop: Callable[..., LoopStack]) -> None:
    from celery_redis_retry.testing import RedisSentinel

    stack = make_loop(sentinel=True, sentinel_down_after_ms=30_000, **DEFAULTS)
    target = stack.target
    assert isinstance(target, RedisSentinel)
    stack.start_worker()
    bridge = stack.start_bridge()
    stack.wait_assigned(bridge)
    counters = [f"n:{i}" for i in range(500)]
    stack.publish_all([ops.incrby(key, 1) for key in counters])
    old = target.master()
    replica = next(s for s in target.servers if s is not old)
    with replica.client() as client:
        wait_until(lambda: client.mget(counters) == [b"1"] * 500, 60, what="the replica to have the first ops")

    old.kill()
    killed = time.monotonic()
    sessions = [f"session:{i}" for i in range(500)]
    stack.publish_all([*(ops.incrby(key, 1) for key in counters), *(ops.set(key, "v") for key in sessions)])
    stack.wait_for(lambda: target.master_port() == replica.port, 90, "the Sentinel to promote the replica")
    promoted = time.monotonic() - killed
    with replica.client() as client:
        stack.wait_for(lambda: client.mget(counters) == [b"2"] * 500 and client.mget(sessions) == [b"v"] * 500,
                       90, "every op applied on the new master")
        applied = time.monotonic() - killed
        time.sleep(3)
        assert client.mget(counters) == [b"2"] * 500, "an op applied twice"
    print(f"\nmaster killed; Sentinel promoted the replica after {promoted:.1f} s; all 1,000 ops applied once "
          f"on the new master {applied:.1f} s after the kill")
    assert promoted >= 30, "Sentinel's default down-after-milliseconds is 30 s"
    assert stack.dlq_is_empty(), "an op died of the failover"
    assert stack.worker_log_count(r"retrying in") == 0
    assert stack.outage_seen()


# -- 3 and 4. one target down, the other unaffected ---------------------------------------------


def _percentiles(latencies: list[float]) -> tuple[float, float]:
    cuts = statistics.quantiles(latencies, n=100)
    return cuts[49], cuts[98]


def test_one_target_down_leaves_the_other_alone(make_loop: Callable[..., LoopStack], tmp_path: Path) -> None:
    other = RedisServer(free_port(), args=("--appendonly", "yes"), dir=str(tmp_path)).start()
    try:
        _one_target_down(make_loop, other)
    finally:
        other.stop()


def _one_target_down(make_loop: Callable[..., LoopStack], other: RedisServer) -> None:
    stack = make_loop(extra_targets={"b": other.url}, **DEFAULTS)
    stack.start_worker(concurrency=2)
    bridge = stack.start_bridge()
    stack.wait_assigned(bridge)
    with stack.client() as r:
        r.set("a:string", "not a list")

    rate = 80.0  # ops/s to each target: enough samples for a p99 in phases of seconds

    def phase(name: str, seconds: float) -> list[RedisOp]:
        """Publish to both targets at ``rate`` ops/s each; return the healthy target's ops."""
        healthy: list[RedisOp] = []
        begun = time.monotonic()
        for n in range(int(seconds * rate)):
            op = ops.script("stamp", keys=[f"a:{name}:{n}"])
            healthy.append(op)
            stack.producer.publish(op)
            stack.producer.publish(ops.set(f"b:{name}:{n}", n).with_target("b"))
            time.sleep(max(0.0, begun + (n + 1) / rate - time.monotonic()))
        assert stack.producer.flush(30) == 0
        return healthy

    def latencies(healthy: list[RedisOp]) -> list[float]:
        with stack.client() as r:
            keys = [str(op.first_key) for op in healthy]
            stack.wait_for(lambda: all(v is not None for v in r.mget(keys)), 60, "the healthy target's ops applied")
            return [float(v) - op.created_at for v, op in zip(r.mget(keys), healthy, strict=True)]

    both_up = latencies(phase("up", 10))
    other.kill()
    wrong_type = ops.lpush("a:string", "x")
    short_lived = ops.set("b:deadline", "v").with_target("b").with_deadline(20)
    phase("warmup", 3)  # the circuit opens in the first second: not measured
    stack.publish_all([wrong_type, short_lived])
    during = phase("down", 25)  # past the op's 20 s deadline and far past the 7 s of its retries
    [letter] = stack.dead_letters(count=1, timeout=10, idle=0.5)
    dead_after = letter.last_failure_at - wrong_type.created_at  # when the worker wrote its record
    one_down = latencies(during)

    other.start()
    with other.client() as b:
        stack.wait_for(lambda: data_keys(b) >= (10 + 3 + 25) * rate, 120, "the other target's ops applied after it")
        time.sleep(2)
        assert b.get("b:deadline") is None, "an op past its deadline was applied"
    stack.wait_for(lambda: stack.bridge_log_count(rf"op {short_lived.id} expired") == 1, 30,
                   "the op past its deadline to end expired")

    (p50_up, p99_up), (p50_down, p99_down) = _percentiles(both_up), _percentiles(one_down)
    print(f"\nhealthy target, capture to applied: p50 {p50_up * 1000:.1f} ms / p99 {p99_up * 1000:.1f} ms with both "
          f"up; p50 {p50_down * 1000:.1f} ms / p99 {p99_down * 1000:.1f} ms with the other down; WRONGTYPE dead in "
          f"{dead_after:.1f} s")
    assert (letter.op_id, letter.reason, letter.attempts) == (wrong_type.id, "wrong_type", 1)
    assert dead_after < 5, "a WRONGTYPE op dies at once, whatever another target does"
    assert len(stack.dead_letters(idle=2)) == 1, "only the WRONGTYPE op is dead"
    assert p50_down <= p50_up * 1.2
    assert p99_down <= p99_up * 1.2


# -- 5. a target loading its dataset --------------------------------------------------------------


def test_a_target_loading_its_dataset_for_10_s_kills_no_op_and_applies_none_early(
    make_loop: Callable[..., LoopStack],
) -> None:
    # Sleeping 50 us per key while loading 100,000 keys, and answering clients (LOADING)
    # every KiB of the file read: a dataset that loads for 14-35 s (slower on a busy machine).
    stack = make_loop(target_args=("--appendonly", "no", "--enable-debug-command", "local", "--key-load-delay", "50",
                                   "--loading-process-events-interval-bytes", "1024"), **DEFAULTS)
    target = stack.target
    assert isinstance(target, RedisServer)
    with stack.client() as r:
        r.execute_command("DEBUG", "POPULATE", 100_000, "dataset")
        r.save()
    stack.start_worker()
    bridge = stack.start_bridge()
    stack.wait_assigned(bridge)

    target.kill()
    ManagedProcess.start(target)  # without waiting for PING: it answers LOADING for a while
    loading_seen: list[float] = []
    probe = redis.Redis(port=target.port, socket_timeout=1)

    def loaded() -> bool:
        try:
            if int(probe.info("persistence")["loading"]):
                loading_seen.append(time.time())
                return False
            return True
        except redis.ConnectionError:
            return False

    wait_until(lambda: bool(loading_seen) or loaded(), 10, interval=0.02, what="the target to start loading")
    stamps = [ops.script("stamp", keys=[f"stamp:{i}"]) for i in range(500)]
    counters = [ops.incrby(f"count:{i}", 1) for i in range(500)]
    stack.publish_all([*stamps, *counters])
    wait_until(loaded, 60, interval=0.02, what="the dataset to load")
    load_seconds = loading_seen[-1] - loading_seen[0]

    with stack.client() as r:
        keys = [f"stamp:{i}" for i in range(500)]
        stack.wait_for(lambda: all(v is not None for v in r.mget(keys)), 60, "every op applied")
        stack.wait_for(lambda: r.mget([f"count:{i}" for i in range(500)]) == [b"1"] * 500, 30, "every counter once")
        first_applied = min(float(v) for v in r.mget(keys))
    probe.close()
    print(f"\ntarget answered LOADING for {load_seconds:.1f} s; first op applied "
          f"{first_applied - loading_seen[-1]:.2f} s after the last LOADING was seen")
    assert load_seconds >= 10
    assert first_applied > loading_seen[-1], "an op was applied while the dataset was still loading"
    assert stack.dlq_is_empty()
    assert stack.worker_log_count(r"retrying in") == 0


# -- restarts: nothing is remembered but the ops -------------------------------------------------


def test_a_restarted_bridge_neither_forgets_an_outage_nor_keeps_one_that_ended(
    make_loop: Callable[..., LoopStack],
) -> None:
    stack = make_loop(**DEFAULTS)
    target = stack.target
    assert isinstance(target, RedisServer)
    stack.start_worker()
    first = stack.start_bridge()
    stack.wait_assigned(first)
    target.kill()
    counters = [f"n:{i}" for i in range(300)]
    stack.publish_all([ops.incrby(key, 1) for key in counters])
    stack.wait_for(lambda: json.loads(stack.cli("redis-retry", "status", "--json").stdout)
                   ["targets"]["default"]["waiting"] == 300, 30, "every op parked")

    first.kill()  # SIGKILL, mid-outage: whatever it knew is gone
    second = stack.start_bridge()
    second.wait_for_log(r"target 'default' cannot take writes", timeout=30)  # its first probe saw it
    time.sleep(3)
    assert stack.dlq_is_empty(settle=1)
    assert "circuit recovering" not in second.log_text()

    second.kill()
    target.start()  # the outage ends while no bridge runs
    third = stack.start_bridge()
    with stack.client() as r:
        stack.wait_for(lambda: r.mget(counters) == [b"1"] * 300, 60, "every op applied once")
    assert "cannot take writes" not in third.log_text(), "a restarted bridge kept an outage that had ended"
    assert stack.dlq_is_empty()
    assert stack.worker_log_count(r"retrying in") == 0
