"""Prometheus metrics of the three roles, scraped over HTTP from real processes.

The worker runs with two prefork children: the figures it serves are the sum of what
its children replayed.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from loop_stack import LoopStack

from celery_redis_retry import ops
from celery_redis_retry.capture.producer import RetryProducer
from celery_redis_retry.config import Settings
from celery_redis_retry.errors import ConfigurationError
from celery_redis_retry.kafka import new_producer
from celery_redis_retry.metrics import register_producer_metrics
from celery_redis_retry.testing import EmbeddedKafka, RedisServer, free_port

pytestmark = pytest.mark.slow


def _scrape(port: int) -> dict[str, float]:
    """``name{labels}`` -> value of every sample served on ``port``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_bridge_and_worker_serve_their_counters(make_loop: Callable[..., LoopStack]) -> None:
    worker_port, bridge_port = free_port(), free_port()
    stack = make_loop(extra_env={"CRR_WORKER_METRICS_PORT": str(worker_port)})
    with stack.client() as r:
        r.set("a-string", "x")
    stack.start_worker(concurrency=2)
    bridge = stack.start_bridge("--metrics-port", str(bridge_port))
    producer = new_producer(stack.settings().kafka)
    producer.produce(stack.topic, os.urandom(32), b"poison")
    assert producer.flush(10) == 0
    stack.publish_all([*(ops.set(f"k{i}", i) for i in range(100)), *(ops.sadd("a-string", i) for i in range(5))])
    stack.wait_assigned(bridge)
    assert len(stack.dead_letters(count=6)) == 6

    def worker_figures() -> dict[str, float] | None:
        samples = _scrape(worker_port)
        done = samples['crr_replay_ops_total{outcome="applied"}'] + samples['crr_replay_ops_total{outcome="dead"}']
        return samples if done == 105 else None

    samples = stack.wait_for(worker_figures, 30, "the worker's metrics to count every op")
    assert samples['crr_replay_ops_total{outcome="applied"}'] == 100
    assert samples['crr_replay_ops_total{outcome="dead"}'] == 5
    assert samples['crr_replay_ops_total{outcome="retrying"}'] == 0
    children = set(re.findall(r"ForkPoolWorker-\d+", stack.worker.log_text() if stack.worker else ""))
    print(f"\nworker children that logged: {sorted(children)}")

    samples = _scrape(bridge_port)
    assert samples["crr_bridge_ops_dispatched_total"] == 105
    assert samples["crr_bridge_ops_rejected_total"] == 1
    assert samples["crr_bridge_assigned_partitions"] == 4
    assert samples["crr_bridge_backpressure_active"] == 0
    assert samples["crr_bridge_backpressure_pauses_total"] >= 0
    assert not any("reading_paused" in name or "reading_is_paused" in name for name in samples)
    assert samples["crr_bridge_tasks_sent_total"] >= 1


def test_a_bridge_whose_metrics_port_is_taken_exits_3(make_loop: Callable[..., LoopStack]) -> None:
    stack = make_loop()
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = stack.cli("redis-retry", "bridge", "--metrics-port", str(port))
    assert done.returncode == 3, done.stderr
    assert f"cannot serve metrics on port {port}" in done.stderr


def test_producer_counters_join_the_applications_registry(kafka: EmbeddedKafka, tmp_path: object) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    settings = Settings.from_mapping({
        "redis_retry_kafka": kafka.config, "redis_retry_targets": {"default": "redis://127.0.0.1:1"},
        "redis_retry_topic": f"metrics-{free_port()}", "redis_retry_spool_path": f"{tmp_path}/spool.sqlite3",
    })
    registry = CollectorRegistry()
    register_producer_metrics(registry)

    def published() -> float:  # summed over this process's producers, other tests' included
        text = generate_latest(registry).decode()
        assert re.search(r"^crr_spool_messages \d", text, re.MULTILINE), text
        found = re.search(r"^crr_producer_published_total (\S+)$", text, re.MULTILINE)
        assert found, text
        return float(found.group(1))

    producer = RetryProducer(settings, handle_sigterm=False)
    try:
        before = published()
        for i in range(10):
            producer.publish(ops.set(f"k{i}", i))
        assert producer.flush(10) == 0
        assert published() == before + 10
    finally:
        producer.close(5)


def test_a_metrics_port_must_be_a_port() -> None:
    base = {"redis_retry_kafka": {"bootstrap.servers": "x:1"}, "redis_retry_targets": {"default": "redis://x"}}
    with pytest.raises(ConfigurationError, match="redis_retry_worker_metrics_port"):
        Settings.from_mapping({**base, "redis_retry_worker_metrics_port": 70000})
    assert Settings.from_mapping({**base, "redis_retry_bridge_metrics_port": 9100}).bridge_metrics_port == 9100


def test_status_and_metrics_show_the_ops_waiting_for_a_retry(make_loop: Callable[..., LoopStack]) -> None:
    # OOM is not an outage: the op spends an attempt and waits 30-60 s for the next one,
    # held by the worker, neither in the Celery queue nor in Kafka's lag.
    bridge_port = free_port()
    stack = make_loop(max_retries=10, backoff=60, backoff_max=120)
    with stack.client() as r:
        r.config_set("maxmemory", 1)
    stack.start_worker(concurrency=2)
    bridge = stack.start_bridge("--metrics-port", str(bridge_port))
    stack.wait_assigned(bridge)
    captured_at = time.time()
    stack.publish_all([ops.set(f"k{i}", i) for i in range(5)])

    def status() -> dict[str, Any]:
        done = stack.cli("redis-retry", "status", "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    figures = stack.wait_for(lambda: (s := status())["retrying"]["ops"] == 5 and s, 60,
                             "status to show the 5 ops held for their next attempt")
    assert figures["retrying"]["workers"] == 1
    assert 0 <= figures["retrying"]["oldest_age"] <= time.time() - captured_at + 1
    assert figures["queued_tasks"] == 0  # the worker took them: the queue alone would say nothing waits
    text = stack.cli("redis-retry", "status").stdout
    assert re.search(r"retrying     5 ops held by 1 worker until their next attempt, the oldest captured \d+ s ago",
                     text), text

    samples = stack.wait_for(lambda: (s := _scrape(bridge_port)).get("crr_bridge_ops_retrying") == 5 and s, 30,
                             "the bridge to count the 5 ops its workers reported retrying")
    assert samples["crr_bridge_oldest_retrying_seconds"] >= 0
    assert samples["crr_bridge_ops_in_flight"] == 5


def _probe(port: int, path: str) -> tuple[int, dict[str, Any]]:
    """The status and JSON body of ``GET path`` on a bridge's health port."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_readyz_fails_while_the_celery_broker_is_down_and_recovers_with_it(
    make_loop: Callable[..., LoopStack],
) -> None:
    health_port = free_port()
    stack = make_loop()
    assert stack.broker is not None
    bridge = stack.start_bridge("--health-port", str(health_port))
    stack.wait_assigned(bridge)
    stack.wait_for(lambda: _probe(health_port, "/readyz")[0] == 200, 30, "the bridge to be ready")
    status, body = _probe(health_port, "/readyz")
    assert body == {"status": "ok", "kafka": "ok", "celery_broker": "ok", "partitions": "ok"}
    status, body = _probe(health_port, "/healthz")
    assert (status, body["status"], body["loop"]) == (200, "ok", "turning")
    assert body["seconds_since_last_turn"] < 5

    stack.broker.kill()
    status, body = stack.wait_for(lambda: (r := _probe(health_port, "/readyz"))[0] == 503 and r, 30,
                                  "/readyz to fail with the Celery broker down")
    assert (body["status"], body["celery_broker"], body["kafka"]) == ("failing", "no answer", "ok")
    assert _probe(health_port, "/healthz")[0] == 200, "a bridge whose broker is down is not hung"

    stack.broker.start()
    stack.wait_for(lambda: _probe(health_port, "/readyz")[0] == 200, 60, "/readyz to recover with the broker")
    assert _probe(health_port, "/nope")[0] == 404


def test_a_loop_that_stopped_turning_is_not_alive() -> None:
    from types import SimpleNamespace

    from celery_redis_retry.bridge.health import BridgeHealth

    bridge = SimpleNamespace(app=None, settings=SimpleNamespace(queue="q"), last_turn=None)
    health = BridgeHealth(bridge, stalled_after=60)  # type: ignore[arg-type]
    assert health.liveness() == (True, {"loop": "starting"})
    bridge.last_turn = time.monotonic() - 5
    assert health.liveness()[0] is True
    bridge.last_turn = time.monotonic() - 61
    alive, checks = health.liveness()
    assert (alive, checks["loop"]) == (False, "stalled")
    assert checks["seconds_since_last_turn"] >= 61


def test_a_scrape_shows_lag_latency_and_outcomes_moving_as_driven(make_loop: Callable[..., LoopStack]) -> None:
    """Lag while no worker runs, then the capture-to-outcome histogram and the outcomes
    applied, duplicate, superseded and dead, each by exactly what was driven."""
    worker_port, bridge_port = free_port(), free_port()
    stack = make_loop(extra_env={"CRR_WORKER_METRICS_PORT": str(worker_port)})
    bridge = stack.start_bridge("--metrics-port", str(bridge_port))
    stack.wait_assigned(bridge)
    with stack.client() as r:
        r.set("a-string", "x")
        r.set("guarded", "current")
    counted = [ops.incrby(f"n{i}", 1) for i in range(200)]
    twice = ops.incrby("twice", 1)
    stale = ops.set("guarded", "stale").if_value("old")  # its guard fails: superseded
    dead = ops.sadd("a-string", "m")  # WRONGTYPE: dead at once
    stack.publish_all([*counted, twice, twice, stale, dead])

    def lag() -> float:
        return sum(v for k, v in _scrape(bridge_port).items() if k.startswith("crr_bridge_partition_lag{"))

    # No worker yet: every op is handed over, none has ended.
    stack.wait_for(lambda: lag() >= 204, 30, "the lag to count the ops not ended")
    stack.start_worker(concurrency=2)

    def worker_figures() -> dict[str, float] | None:
        samples = _scrape(worker_port)
        ended = sum(samples[f'crr_replay_ops_total{{outcome="{o}"}}'] for o in ("applied", "duplicate", "superseded"))
        return samples if ended == 203 and samples['crr_replay_ops_total{outcome="dead"}'] == 1 else None

    samples = stack.wait_for(worker_figures, 60, "the worker's metrics to count every op")
    assert samples['crr_replay_ops_total{outcome="applied"}'] == 201
    assert samples['crr_replay_ops_total{outcome="duplicate"}'] == 1
    assert samples['crr_replay_ops_total{outcome="superseded"}'] == 1
    assert samples['crr_replay_ops_total{outcome="dead"}'] == 1
    assert samples["crr_replay_latency_seconds_count"] == 203  # every op that reached its target
    assert samples['crr_replay_latency_seconds_bucket{le="+Inf"}'] == 203
    assert samples["crr_replay_latency_seconds_sum"] > 0
    assert samples['crr_replay_latency_seconds_bucket{le="0.01"}'] == 0, "nothing waited for a worker that fast"
    stack.wait_for(lambda: lag() == 0, 30, "the lag to fall to 0 once every op ended")


def test_a_scrape_shows_expired_retrying_and_waiting_as_driven(
    make_loop: Callable[..., LoopStack], tmp_path: Path,
) -> None:
    """The outcomes a worker meets when ops wait in Celery: past their deadline (expired), on a
    target that refuses writes for a while (retrying), on a paused target (waiting)."""
    other = RedisServer(free_port(), dir=str(tmp_path)).start()
    try:
        worker_port, bridge_port = free_port(), free_port()
        stack = make_loop(extra_targets={"b": other.url}, extra_env={"CRR_WORKER_METRICS_PORT": str(worker_port)})
        bridge = stack.start_bridge("--metrics-port", str(bridge_port))
        stack.wait_assigned(bridge)

        def handed_over(count: int) -> None:
            stack.wait_for(lambda: _scrape(bridge_port)["crr_bridge_ops_dispatched_total"] == count, 30,
                           f"{count} ops handed over")

        # No worker yet: each op waits in the Celery queue.
        expiring = ops.set("soon", "v").with_deadline(2)
        stack.publish_all([expiring])
        handed_over(1)
        refused = ops.incrby("refused", 1)  # NOREPLICAS below: retryable, not an outage
        held = ops.set("held", "v").with_target("b")  # its target is paused below
        stack.publish_all([refused, held])
        handed_over(3)
        assert stack.cli("redis-retry", "target", "pause", "b").returncode == 0
        with stack.client() as r:
            r.config_set("min-replicas-to-write", 1)
            assert expiring.deadline is not None
            time.sleep(max(0.0, expiring.deadline - time.time()) + 0.5)
            stack.start_worker(concurrency=1)

            def outcomes() -> dict[str, float] | None:
                samples = _scrape(worker_port)
                counts = {o: samples[f'crr_replay_ops_total{{outcome="{o}"}}'] for o in ("expired", "retrying",
                                                                                       "waiting", "applied")}
                return counts if counts["expired"] and counts["retrying"] and counts["waiting"] else None

            counts = stack.wait_for(outcomes, 60, "expired, retrying and waiting to be counted")
            assert (counts["expired"], counts["waiting"], counts["applied"]) == (1, 1, 0)
            r.config_set("min-replicas-to-write", 0)
            stack.wait_for(lambda: r.get("refused") == b"1", 60, "the refused op applied once writes are taken")
        assert stack.cli("redis-retry", "target", "resume", "b").returncode == 0
        with other.client() as b:
            stack.wait_for(lambda: b.get("held") == b"v", 60, "the held op applied after the resume")
        with stack.client() as r:
            assert r.get("soon") is None, "an op past its deadline was applied"
        assert _scrape(worker_port)['crr_replay_ops_total{outcome="applied"}'] == 2
    finally:
        other.stop()
