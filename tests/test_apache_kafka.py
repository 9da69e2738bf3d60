"""The loop on Apache Kafka itself: a 3-broker KRaft cluster, RF 3, min.insync.replicas 2, auto-create off.

Every process is real: three Kafka JVMs (``kafka_cluster``, shared by the session), the
target redis-server, the Celery broker, a ``celery worker`` and ``celery redis-retry
bridge`` subprocesses. What the mock cluster and Tansu cannot show is shown here: a
partition leader SIGKILLed under load, the whole cluster down, and the broker-driven
rebalance protocol (KIP-848) with a bridge SIGKILLed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from loop_stack import LoopStack
from test_loop import outage_then_recovery, permanent_failures_and_poison

from celery_redis_retry import message, ops
from celery_redis_retry.testing import ApacheKafka, read_topic, wait_until

pytestmark = pytest.mark.slow

#: How many lists the load ops append to: enough keys to land on every partition.
LISTS = 32


# -- the harness itself -------------------------------------------------------------------


def test_the_cluster_is_production_like(kafka_cluster: ApacheKafka) -> None:
    assert len(kafka_cluster.nodes) == 3
    assert all(node.running for node in kafka_cluster.nodes)
    assert kafka_cluster.start_seconds is not None
    print(f"\n3-broker cluster started in {kafka_cluster.start_seconds:.1f}s")
    properties = kafka_cluster.node_properties(kafka_cluster.nodes[0])
    assert properties["auto.create.topics.enable"] == "false"
    assert properties["min.insync.replicas"] == 2
    assert properties["default.replication.factor"] == 3


def test_a_restarted_node_keeps_its_log(apache_kafka: ApacheKafka, unique_topic: str) -> None:
    from celery_redis_retry import kafka

    apache_kafka.create_topic(unique_topic, partitions=1)
    producer = kafka.new_producer(apache_kafka.config)
    for i in range(100):
        producer.produce(unique_topic, str(i).encode())
    assert producer.flush(30) == 0
    node = apache_kafka.nodes[0]
    node.kill()
    apache_kafka.start()
    assert [r.value for r in read_topic(apache_kafka.bootstrap_servers, unique_topic, count=100)] == [
        str(i).encode() for i in range(100)
    ]


def test_a_cluster_id_that_starts_with_a_dash_is_formatted(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery_redis_retry.testing import apache_kafka

    monkeypatch.setattr(apache_kafka, "_cluster_id", lambda: "-" + "A" * 21)  # 1 in 64 random ids do
    cluster = ApacheKafka(1, dir=tmp_path)
    try:
        assert cluster.start().start_seconds is not None
    finally:
        cluster.stop()


# -- the loop on three brokers ------------------------------------------------------------


def loop_with_topics_from_the_cli(
    make_loop: Callable[..., LoopStack], cluster: ApacheKafka, **options: Any
) -> LoopStack:
    """A loop whose topics were made by ``redis-retry topics create``, as docs/operations.md says."""
    stack = make_loop(kafka_broker=cluster, create_topics=False, **options)
    created = stack.cli("redis-retry", "topics", "create", "--partitions", "4", "--dlq-partitions", "4")
    assert created.returncode == 0, created.stdout + created.stderr
    described = stack.cli("redis-retry", "topics", "describe")
    # The retry, DLQ, ends, control and waiting topics.
    assert described.stdout.count("replication factor 3, min.insync.replicas 2") == 5, described.stdout
    return stack


def test_outage_then_recovery_on_three_brokers(make_loop: Callable[..., LoopStack], kafka_cluster: ApacheKafka) -> None:
    stack = loop_with_topics_from_the_cli(
        make_loop, kafka_cluster, target_running=False, max_retries=12, backoff=0.5, backoff_max=4.0
    )
    outage_then_recovery(stack, 2000)


def test_permanent_failures_and_poison_on_three_brokers(
    make_loop: Callable[..., LoopStack], kafka_cluster: ApacheKafka
) -> None:
    permanent_failures_and_poison(loop_with_topics_from_the_cli(make_loop, kafka_cluster))


# -- measuring publish and apply while something breaks ------------------------------------


class ApplyWatch:
    """Polls the target every 50 ms and records the longest time no new op was applied while some were due."""

    def __init__(self, stack: LoopStack, published: Callable[[], int]) -> None:
        self.stack = stack
        self.published = published
        self.applied = 0
        self.longest_stall = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ApplyWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        with self.stack.client() as r:
            last_progress = time.monotonic()
            while not self._stop.wait(0.05):
                applied = applied_count(r)
                now = time.monotonic()
                if applied > self.applied or applied >= self.published():
                    last_progress = now
                self.applied = applied
                self.longest_stall = max(self.longest_stall, now - last_progress)


def publish_at_rate(
    stack: LoopStack, count: int, per_second: int, during: Callable[[float], None] = lambda _elapsed: None
) -> tuple[list[ops.RedisOp], float]:
    """Publish ``count`` RPUSH ops at ``per_second``; call ``during(elapsed)`` between batches.

    Op ``i`` appends ``i`` to one of :data:`LISTS` lists (spread over every partition), so
    an op applied twice shows as a repeated value. Returns the ops and the longest a single
    ``publish`` call took (it must never block on Kafka).
    """
    built = [ops.rpush(f"applied:{i % LISTS}", i) for i in range(count)]
    started = time.monotonic()
    slowest_call = 0.0
    batch = max(1, per_second // 100)
    for first in range(0, count, batch):
        for op in built[first:first + batch]:
            before = time.monotonic()
            stack.producer.publish(op)
            slowest_call = max(slowest_call, time.monotonic() - before)
        during(time.monotonic() - started)
        ahead = (first + batch) / per_second - (time.monotonic() - started)
        if ahead > 0:
            time.sleep(ahead)
    return built, slowest_call


def op_ids_in_topic(stack: LoopStack, expected: int) -> list[str]:
    """The op id of every record in the ops topic, once ``expected`` of them are there (duplicates kept)."""
    read_topic(stack.kafka.bootstrap_servers, stack.topic, count=expected, timeout=120)
    records = read_topic(stack.kafka.bootstrap_servers, stack.topic, timeout=60, idle=3)
    return [message.decode(r.value or b"").id for r in records]


def publish_stall(stack: LoopStack) -> float:
    """The longest time from an op's creation to its append in Kafka (the topic records LogAppendTime)."""
    records = read_topic(stack.kafka.bootstrap_servers, stack.topic, timeout=60, idle=3)
    return max(r.timestamp_ms / 1000 - message.decode(r.value or b"").created_at for r in records)


def applied_count(r: Any) -> int:
    """How many ops have been applied (duplicates included)."""
    with r.pipeline(transaction=False) as pipe:
        for n in range(LISTS):
            pipe.llen(f"applied:{n}")
        return sum(pipe.execute())


def each_applied_once(stack: LoopStack, built: list[ops.RedisOp]) -> None:
    count = len(built)
    with stack.client() as r:
        stack.wait_for(lambda: applied_count(r) >= count, 240, f"all {count} ops applied")
        time.sleep(2)  # a late duplicate would land now
        values = [int(v) for n in range(LISTS) for v in r.lrange(f"applied:{n}", 0, -1)]
    assert len(values) == count, f"{len(values)} applies for {count} ops"
    assert sorted(values) == list(range(count)), "some op applied twice and another never"


def running_loop_on_cluster(make_loop: Callable[..., LoopStack], cluster: ApacheKafka) -> LoopStack:
    """A loop with its worker and bridge running; its ops topic records LogAppendTime, so publish
    latency can be read back from Kafka."""
    stack = make_loop(kafka_broker=cluster, create_topics=False)
    cluster.create_topic(stack.topic, partitions=4, config={"message.timestamp.type": "LogAppendTime"})
    cluster.create_topic(stack.dlq_topic, partitions=4)
    cluster.create_topic(stack.ends_topic, partitions=4)
    for waiting in stack.waiting_topics:
        cluster.create_topic(waiting, partitions=4)
    stack.start_worker(concurrency=2)
    stack.wait_assigned(stack.start_bridge())
    return stack


class Outage:
    """Calls ``breaks()`` ``at`` seconds into publishing and restarts the cluster ``lasting`` seconds later.

    Used as the ``during`` callback of :func:`publish_at_rate`. The restart runs in a thread
    (starting JVMs takes seconds), so publishing goes on meanwhile.
    """

    def __init__(self, cluster: ApacheKafka, breaks: Callable[[], None], at: float, lasting: float) -> None:
        self.cluster, self.breaks, self.at, self.lasting = cluster, breaks, at, lasting
        self.began: float | None = None
        self.ended: float | None = None

    def __call__(self, elapsed: float) -> None:
        if self.began is None and elapsed >= self.at:
            self.breaks()
            self.began = elapsed
        elif self.began is not None and self.ended is None and elapsed >= self.began + self.lasting:
            threading.Thread(target=self.cluster.start, daemon=True).start()
            self.ended = elapsed

    def wait_over(self) -> None:
        assert self.ended is not None, "publishing ended before the outage did"
        wait_until(lambda: all(node.running for node in self.cluster.nodes), 120, what="every node back")
        self.cluster.wait_writable(60)


@pytest.mark.extended  # the chaos run plays this fault with full accounting in make test
def test_leader_failover_under_load_loses_and_duplicates_nothing(
    make_loop: Callable[..., LoopStack], kafka_cluster: ApacheKafka
) -> None:
    stack = running_loop_on_cluster(make_loop, kafka_cluster)
    count, rate = 20_000, 2_000
    victim = kafka_cluster.leader_of(stack.topic, 0)
    outage = Outage(kafka_cluster, victim.kill, at=3.0, lasting=4.0)
    published = 0
    with ApplyWatch(stack, lambda: published) as watch:
        built, slowest_call = publish_at_rate(stack, count, rate, outage)
        published = count
        outage.wait_over()
        assert stack.producer.flush(120) == 0
        each_applied_once(stack, built)
    ids = op_ids_in_topic(stack, count)
    assert len(ids) == count, f"{len(ids)} records for {count} ops"
    assert set(ids) == {op.id for op in built}, "an op is missing from the topic"
    stall = publish_stall(stack)
    print(f"\nleader failover: node {victim.node_id} killed at {outage.began:.1f}s, restarted at "
          f"{outage.ended:.1f}s; {count} ops at {rate}/s; longest publish() call {slowest_call * 1000:.1f} ms; "
          f"longest publish->Kafka {stall:.2f}s; longest apply stall {watch.longest_stall:.2f}s; "
          f"spooled {stack.producer.stats.spooled}")
    assert stack.dlq_is_empty()


@pytest.mark.extended  # the chaos run plays this fault with full accounting in make test
def test_whole_cluster_down_for_30s_while_publishing(
    make_loop: Callable[..., LoopStack], kafka_cluster: ApacheKafka
) -> None:
    stack = running_loop_on_cluster(make_loop, kafka_cluster)
    count, rate = 7_000, 200
    outage = Outage(kafka_cluster, kafka_cluster.kill, at=2.0, lasting=30.0)
    try:
        built, slowest_call = publish_at_rate(stack, count, rate, outage)
    finally:
        outage.wait_over()
    spooled = stack.producer.stats.spooled
    assert spooled > 0, "with every broker down, ops should have gone to the spool"
    stack.producer.flush(60)
    wait_until(lambda: stack.producer.spool.count() == 0, 120, interval=0.5, what="the spool to drain into Kafka")
    ids = op_ids_in_topic(stack, count)
    assert {op.id for op in built} <= set(ids), f"{len({op.id for op in built} - set(ids))} ops never reached Kafka"
    each_applied_once(stack, built)
    assert outage.began is not None
    assert outage.ended is not None
    print(f"\ncluster down {outage.ended - outage.began:.0f}s: {count} ops at {rate}/s; spooled {spooled}; "
          f"records in topic {len(ids)} ({len(ids) - len(set(ids))} resent); "
          f"longest publish() call {slowest_call * 1000:.1f} ms")
    assert stack.dlq_is_empty()


# -- KIP-848: the broker runs the rebalance -------------------------------------------------


def test_two_bridges_on_the_consumer_protocol_one_killed(
    make_loop: Callable[..., LoopStack], kafka_cluster: ApacheKafka
) -> None:
    stack = make_loop(kafka_broker=kafka_cluster, kafka_settings={"group.protocol": "consumer"})
    stack.start_worker(concurrency=2)
    first = stack.start_bridge("--batch-size", "50")
    second = stack.start_bridge("--batch-size", "50")
    stack.wait_assigned(first)
    stack.wait_assigned(second)
    assert kafka_cluster.describe_group(f"group-{stack.name}") == ("consumer", 2), "two KIP-848 members"
    count = 6000
    published = 0

    def kill_first(elapsed: float) -> None:
        if first.running and elapsed >= 2.0:
            first.kill()

    with ApplyWatch(stack, lambda: published) as watch:
        built, _ = publish_at_rate(stack, count, 1000, kill_first)
        published = count
        assert stack.producer.flush(60) == 0
        each_applied_once(stack, built)
    assert first.returncode == -9, "the first bridge was SIGKILLed"
    assert second.running
    duplicates = stack.worker_log_count(r"was already applied")
    print(f"\nKIP-848: bridge SIGKILLed at 2s; {count} ops applied once each; longest apply stall "
          f"{watch.longest_stall:.1f}s; duplicates caught by the worker {duplicates}")
    assert stack.dlq_is_empty()


# -- invalid messages too large for a DLQ record ----------------------------------------------


def test_huge_invalid_messages_become_bounded_dlq_records_and_block_nothing(
    make_loop: Callable[..., LoopStack], apache_kafka: ApacheKafka
) -> None:
    import hashlib
    import os

    from celery_redis_retry import kafka
    from celery_redis_retry.dlq.record import MAX_RAW_BYTES

    stack = make_loop(kafka_broker=apache_kafka, create_topics=False)
    apache_kafka.create_topic(stack.topic, partitions=2, config={"max.message.bytes": "6000000"})
    apache_kafka.create_topic(stack.dlq_topic, partitions=2)  # Kafka's default limit: about 1 MB
    apache_kafka.create_topic(stack.ends_topic, partitions=2)
    for waiting in stack.waiting_topics:
        apache_kafka.create_topic(waiting, partitions=2)
    stack.start_worker()
    stack.wait_assigned(stack.start_bridge())
    behind = [ops.rpush("after-huge", i) for i in range(20)]
    huge = {size: os.urandom(size) for size in (800_000, 5_000_000)}
    producer = kafka.new_producer(apache_kafka.config, **{"message.max.bytes": 6_500_000})
    started = time.monotonic()
    for raw in huge.values():  # on the partition of the valid ops, ahead of them
        producer.produce(stack.topic, raw, message.message_key(behind[0]))
    assert producer.flush(30) == 0
    stack.publish_all(behind)
    letters = stack.dead_letters(count=2, timeout=60)
    took = time.monotonic() - started
    by_size = {letter.raw_size: letter for letter in letters}
    assert set(by_size) == set(huge)
    for size, raw in huge.items():
        letter = by_size[size]
        assert letter.outcome == "rejected"
        assert letter.raw == raw[:MAX_RAW_BYTES]
        assert letter.raw_truncated
        assert letter.raw_sha256 == hashlib.sha256(raw).hexdigest()
        assert letter.origin is not None
        assert letter.origin.topic == stack.topic
    with stack.client() as r:
        stack.wait_for(lambda: r.llen("after-huge") == 20, 60, "the valid ops behind the huge ones applied")
        assert sorted(int(v) for v in r.lrange("after-huge", 0, -1)) == list(range(20))
    reasons = sorted(letter.reason for letter in letters)
    print(f"\n800 KB and 5 MB invalid messages: rejected ({reasons}) within {took:.1f}s; the 20 ops behind applied")


def test_a_dead_op_too_large_for_a_whole_dlq_record_keeps_its_id_size_and_digest(
    make_loop: Callable[..., LoopStack], apache_kafka: ApacheKafka
) -> None:
    import hashlib
    import os

    stack = make_loop(kafka_broker=apache_kafka)  # Kafka's default message size limit on both topics
    with stack.client() as r:
        r.set("a-string", "x")
    stack.start_worker()
    stack.wait_assigned(stack.start_bridge())
    # 987 KB encoded: its DLQ record would be over dlq.MAX_RECORD_BYTES (900 KB, kept below
    # librdkafka's 1,000,000-byte message limit), so it is written without the op's body.
    big = ops.lpush("a-string", os.urandom(740_000))
    encoded = message.encode(big)
    stack.publish_all([big, ops.set("after-big", "v")])
    letters = stack.dead_letters(count=1, timeout=60)
    assert len(letters) == 1
    letter = letters[0]
    assert (letter.outcome, letter.reason) == ("dead", "wrong_type")
    assert letter.op is None
    assert letter.op_id == big.id
    assert letter.raw_size == len(encoded)
    assert letter.raw_sha256 == hashlib.sha256(encoded).hexdigest()
    assert letter.raw_truncated
    with stack.client() as r:
        stack.wait_for(lambda: r.get("after-big") == b"v", 60, "the op after the big one applied")
