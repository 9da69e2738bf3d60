"""The faults a chaos run injects, each with its repair: kill, pause, fail over.

Each fault is a function ``(stack, rng) -> detail`` that breaks one thing, waits a drawn
while, and puts it back the way an operator or a supervisor (systemd, Kubernetes) would:
a killed process is started again, a paused one continued, a failed-over server rejoins
as a replica. :data:`FAULTS` names them all; a profile plays each at least once.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable

from celery_redis_retry.testing import wait_until

from .stack import VISIBILITY_S, ChaosStack

Fault = Callable[[ChaosStack, random.Random], str]


def kill_bridge(stack: ChaosStack, rng: random.Random) -> str:
    slot = rng.randrange(len(stack.bridges))
    stack.bridges[slot].kill()
    down = rng.uniform(0.5, 3.0)
    time.sleep(down)
    stack.start_bridge(slot)
    return f"bridge {slot} SIGKILLed, restarted after {down:.1f}s"


def pause_bridge(stack: ChaosStack, rng: random.Random) -> str:
    """Longer than ``session.timeout.ms`` (6 s): the group gives its partitions to the other bridge."""
    slot = rng.randrange(len(stack.bridges))
    paused = rng.uniform(8.0, 12.0)
    stack.bridges[slot].pause()
    time.sleep(paused)
    stack.bridges[slot].resume()
    return f"bridge {slot} SIGSTOPped for {paused:.1f}s"


def kill_worker_child(stack: ChaosStack, rng: random.Random) -> str:
    slot = rng.randrange(len(stack.workers))
    worker = stack.workers[slot]
    children = wait_until(worker.children, 30, what="the worker's pool processes")
    victim = rng.choice(children)
    os.kill(victim, signal.SIGKILL)
    return f"pool process {victim} of worker {slot} SIGKILLed (the worker replaces it)"


def kill_worker_main(stack: ChaosStack, rng: random.Random) -> str:
    """The main process only, as the OOM killer would; its orphaned pool goes a moment later, as under systemd."""
    slot = rng.randrange(len(stack.workers))
    worker = stack.workers[slot]
    worker.kill_leader()
    time.sleep(rng.uniform(0.2, 2.0))
    worker.kill()
    stack.start_worker(slot)
    return f"main process of worker {slot} SIGKILLed, its pool after it, worker restarted"


def pause_worker(stack: ChaosStack, rng: random.Random) -> str:
    """Longer than the Redis broker's visibility timeout: what it held is delivered to the other worker."""
    slot = rng.randrange(len(stack.workers))
    paused = VISIBILITY_S + rng.uniform(3.0, 6.0)
    stack.workers[slot].pause()
    time.sleep(paused)
    stack.workers[slot].resume()
    return f"worker {slot} SIGSTOPped for {paused:.1f}s (visibility timeout {VISIBILITY_S}s)"


def kill_target(stack: ChaosStack, rng: random.Random) -> str:
    target = stack.loop.target
    target.kill()
    down = rng.uniform(1.0, 6.0)
    time.sleep(down)
    target.start()
    return f"target redis-server SIGKILLed, restarted after {down:.1f}s"


def sentinel_failover(stack: ChaosStack, rng: random.Random) -> str:
    sentinel = stack.sentinel
    began = time.monotonic()
    old = sentinel.master()
    new = sentinel.kill_master(timeout=60)
    took = time.monotonic() - began
    time.sleep(rng.uniform(0.0, 3.0))
    old.start()  # the Sentinel turns it into a replica of the new master
    wait_until(lambda: (old.replication() or {}).get("master_link_status") == "up", 60, interval=0.2,
               what="the old master to rejoin as a replica in sync")
    return f"Sentinel master :{old.port} SIGKILLed, :{new.port} promoted in {took:.1f}s; the old one rejoined"


def cluster_failover(stack: ChaosStack, rng: random.Random) -> str:
    cluster = stack.cluster
    began = time.monotonic()
    slot = rng.randrange(16384)
    old = cluster.master_of(slot)
    new = cluster.kill_master(slot, timeout=60)
    took = time.monotonic() - began
    time.sleep(rng.uniform(0.0, 3.0))
    cluster.restart_killed(timeout=60)
    return (f"cluster master :{old.port} (slot {slot}) SIGKILLed, replica :{new.port} promoted in {took:.1f}s; "
            "the old one rejoined as its replica")


def kill_celery_broker(stack: ChaosStack, rng: random.Random) -> str:
    down = rng.uniform(0.5, 3.0)
    if stack.rabbitmq is not None:
        stack.rabbitmq.kill()
        time.sleep(down)
        stack.rabbitmq.start()
        return f"RabbitMQ SIGKILLed, restarted after {down:.1f}s"
    broker = stack.loop.broker
    assert broker is not None
    broker.kill()
    time.sleep(down)
    broker.start()
    return f"Celery broker redis-server (appendfsync everysec) SIGKILLed, restarted after {down:.1f}s"


def kill_app(stack: ChaosStack, rng: random.Random) -> str:
    assert stack.app is not None
    stack.app.kill()
    down = rng.uniform(0.2, 2.0)
    time.sleep(down)
    stack.start_app()
    return f"publishing app SIGKILLed, restarted after {down:.1f}s"


def _kafka_node_down(stack: ChaosStack, rng: random.Random, leader: bool) -> str:
    cluster = stack.kafka_cluster
    assert cluster is not None, "Kafka faults need the Apache Kafka cluster"
    partition = rng.randrange(4)
    lead = cluster.leader_of(stack.loop.topic, partition)
    victim = lead if leader else rng.choice([n for n in cluster.nodes if n is not lead])
    victim.kill()
    down = rng.uniform(2.0, 8.0)
    time.sleep(down)
    victim.start()
    cluster.wait_writable(120)
    role = f"leader of {stack.loop.topic}/{partition}" if leader else "a follower"
    return f"Kafka node {victim.node_id} ({role}) SIGKILLed, restarted after {down:.1f}s"


def kill_kafka_leader(stack: ChaosStack, rng: random.Random) -> str:
    return _kafka_node_down(stack, rng, leader=True)


def kill_kafka_follower(stack: ChaosStack, rng: random.Random) -> str:
    return _kafka_node_down(stack, rng, leader=False)


def kill_kafka_cluster(stack: ChaosStack, rng: random.Random) -> str:
    cluster = stack.kafka_cluster
    assert cluster is not None, "Kafka faults need the Apache Kafka cluster"
    cluster.kill()
    down = rng.uniform(3.0, 10.0)
    time.sleep(down)
    cluster.start()
    return f"every Kafka node SIGKILLed, restarted after {down:.1f}s"


FAULTS: dict[str, Fault] = {
    fault.__name__: fault
    for fault in (
        kill_bridge, pause_bridge, kill_worker_child, kill_worker_main, pause_worker, kill_target,
        sentinel_failover, cluster_failover, kill_celery_broker, kill_app, kill_kafka_leader, kill_kafka_follower,
        kill_kafka_cluster,
    )
}
#: What a RabbitMQ run plays: the faults that involve the Celery broker (the rest do not depend on it).
RABBITMQ_FAULTS = ("kill_celery_broker", "kill_worker_main", "pause_worker", "kill_bridge")
#: The soak's faults: none restarts a bridge or a worker, so their memory can be followed for the whole run.
SOAK_FAULTS = ("kill_target", "sentinel_failover", "cluster_failover", "kill_celery_broker", "kill_kafka_leader",
               "kill_kafka_follower", "kill_worker_child", "kill_app")
