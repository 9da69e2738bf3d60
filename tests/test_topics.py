"""``redis-retry topics create|describe`` and what every role does when a topic is missing.

Real brokers throughout: Apache Kafka with ``auto.create.topics.enable=false`` (1 broker,
and the 3-broker cluster for the production defaults), Tansu for a second CreateTopics
implementation, and the development broker (it auto-creates, and cannot create topics on
request). Every command runs as ``celery -A loop_app redis-retry ...`` in a subprocess.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from loop_stack import LoopStack

from celery_redis_retry import kafka, ops
from celery_redis_retry.capture.producer import RetryProducer
from celery_redis_retry.kafka.topics import DAY_MS
from celery_redis_retry.testing import CeleryCommand, RedisServer, free_port, read_topic, wait_until

pytestmark = pytest.mark.slow

SEVEN_DAYS_MS = str(7 * DAY_MS)
TWENTY_EIGHT_DAYS_MS = str(28 * DAY_MS)
CREATE_HINT = "create it with: celery -A loop_app redis-retry topics create"


@pytest.fixture
def stack_on(
    redis_factory: Callable[..., RedisServer], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., LoopStack]]:
    """``stack_on(broker, **LoopStack options)``: a LoopStack on that Kafka, with a real Celery broker.

    Its target Redis is not started: nothing here replays an op.
    """
    stacks: list[LoopStack] = []

    def make(broker: Any, **options: Any) -> LoopStack:
        workdir = tmp_path_factory.mktemp("topics")
        target = RedisServer(free_port(), dir=str(workdir))
        stack = LoopStack(broker, target, redis_factory().url, workdir, **options)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()


def _described(stack: LoopStack, *names: str) -> dict[str, kafka.TopicDescription | None]:
    return kafka.describe_topics(kafka.new_admin(stack.settings().kafka), list(names))


def _exit_of(command: CeleryCommand, timeout: float) -> tuple[int, float]:
    """Wait for ``command`` to end on its own; its exit code and how long it ran."""
    started = time.monotonic()
    code = wait_until(lambda: command.returncode, timeout, interval=0.1, what=f"{command.name} to exit")
    return code, time.monotonic() - started


# -- topics create / describe ------------------------------------------------------------------


def test_topics_create_then_describe_and_rerun_on_apache_kafka(
    apache_kafka: Any, stack_on: Callable[..., LoopStack]
) -> None:
    stack = stack_on(apache_kafka)
    flags = ("--replication-factor", "1", "--partitions", "6", "--dlq-partitions", "2")

    before = stack.cli("redis-retry", "topics", "describe", *flags)
    assert before.returncode == 5, before.stdout + before.stderr
    assert f"missing      retry topic {stack.topic}:" in before.stdout
    assert f"missing      DLQ topic {stack.dlq_topic}:" in before.stdout

    dry = stack.cli("redis-retry", "topics", "create", *flags, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count("would create") == 5  # retry, DLQ, ends, control and the waiting topic of "default"
    assert _described(stack, stack.topic, stack.dlq_topic) == {stack.topic: None, stack.dlq_topic: None}

    created = stack.cli("redis-retry", "topics", "create", *flags)
    assert created.returncode == 0, created.stderr
    assert created.stdout.count("created") == 5
    # What the cluster has, read back independently of the command's own report.
    ops_topic, dlq_topic = _described(stack, stack.topic, stack.dlq_topic).values()
    assert ops_topic is not None
    assert dlq_topic is not None
    assert (ops_topic.partitions, ops_topic.replication_factor) == (6, 1)
    assert (dlq_topic.partitions, dlq_topic.replication_factor) == (2, 1)
    # 3 retries x 4 s of backoff is far below the floor: 7 days; the DLQ keeps 28.
    assert ops_topic.config["retention.ms"] == SEVEN_DAYS_MS
    assert dlq_topic.config["retention.ms"] == TWENTY_EIGHT_DAYS_MS
    assert ops_topic.config["min.insync.replicas"] == dlq_topic.config["min.insync.replicas"] == "1"
    waiting = _described(stack, f"{stack.topic}.waiting.default")[f"{stack.topic}.waiting.default"]
    assert waiting is not None
    assert (waiting.partitions, waiting.config["retention.ms"]) == (6, SEVEN_DAYS_MS)
    ends = _described(stack, stack.ends_topic)[stack.ends_topic]
    assert ends is not None
    assert (ends.partitions, ends.config["retention.ms"]) == (3, str(DAY_MS))  # read within moments
    control_topic = f"{stack.topic}.control"
    control = _described(stack, control_topic)[control_topic]
    assert control is not None
    assert (control.partitions, control.config["cleanup.policy"]) == (1, "compact")  # the last pause per target

    described = stack.cli("redis-retry", "topics", "describe", *flags)
    assert described.returncode == 0, described.stderr
    assert (f"exists       retry topic {stack.topic}: partitions 6, replication factor 1, min.insync.replicas 1, "
            f"retention.ms {SEVEN_DAYS_MS} (7 days)") in described.stdout
    assert (f"exists       DLQ topic {stack.dlq_topic}: partitions 2, replication factor 1, "
            f"min.insync.replicas 1, retention.ms {TWENTY_EIGHT_DAYS_MS} (28 days)") in described.stdout
    assert "warning" not in described.stderr

    again = stack.cli("redis-retry", "topics", "create", *flags)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("exists") == 5
    assert "created" not in again.stdout

    # Asked for something else, it leaves the topics alone and says how they differ.
    other = stack.cli("redis-retry", "topics", "create", "--replication-factor", "1", "--retention-days", "10")
    assert other.returncode == 0, other.stderr
    assert f"warning: retry topic {stack.topic} differs from the plan, left as it is: partitions 6 (planned 12); " \
           f"retention.ms {SEVEN_DAYS_MS} (planned {10 * DAY_MS})" in other.stderr
    assert f"warning: DLQ topic {stack.dlq_topic} differs from the plan, left as it is: partitions 2 (planned 3)" \
           in other.stderr
    assert _described(stack, stack.topic)[stack.topic] == ops_topic


def test_topics_create_refuses_a_replication_factor_the_cluster_cannot_hold(
    apache_kafka: Any, stack_on: Callable[..., LoopStack]
) -> None:
    stack = stack_on(apache_kafka)
    refused = stack.cli("redis-retry", "topics", "create")  # the default: 3 replicas, on 1 broker
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert (f"error: replication factor 3 needs at least 3 brokers, but the cluster at "
            f"{apache_kafka.bootstrap_servers} has 1; pass --replication-factor 1") in refused.stderr
    assert _described(stack, stack.topic, stack.dlq_topic) == {stack.topic: None, stack.dlq_topic: None}

    too_strict = stack.cli("redis-retry", "topics", "create", "--replication-factor", "1", "--min-insync-replicas", "2")
    assert too_strict.returncode == 2
    assert "min.insync.replicas 2 is more than the replication factor 1" in too_strict.stderr


def test_topics_create_with_production_defaults_on_three_brokers(
    kafka_cluster: Any, stack_on: Callable[..., LoopStack]
) -> None:
    # A retry schedule longer than 4 days: the retention follows it (window + 3 days).
    stack = stack_on(kafka_cluster, max_retries=100, backoff_max=7200.0,
                     extra_env={"CRR_VISIBILITY_TIMEOUT": "86400"})  # longer than the backoff cap, as it must be
    created = stack.cli("redis-retry", "topics", "create")
    assert created.returncode == 0, created.stderr
    ops_topic, dlq_topic = _described(stack, stack.topic, stack.dlq_topic).values()
    assert ops_topic is not None
    assert dlq_topic is not None
    assert (ops_topic.partitions, ops_topic.replication_factor, ops_topic.config["min.insync.replicas"]) == (12, 3, "2")
    assert (dlq_topic.partitions, dlq_topic.replication_factor, dlq_topic.config["min.insync.replicas"]) == (3, 3, "2")
    assert ops_topic.config["retention.ms"] == str(100 * 7200 * 1000 + 3 * DAY_MS)
    # Longer than the dedupe markers live (7 days by default): said, not refused.
    assert (f"warning: retry topic {stack.topic} keeps ops 11.3333 days, longer than redis_retry_dedupe_ttl (7 days): "
            f"raise redis_retry_dedupe_ttl to at least 979200 s") in created.stderr
    assert dlq_topic.config["retention.ms"] == TWENTY_EIGHT_DAYS_MS
    described = stack.cli("redis-retry", "topics", "check")
    assert described.returncode == 0, described.stderr
    assert f"exists       retry topic {stack.topic}: partitions 12, replication factor 3, min.insync.replicas 2" \
        in described.stdout


def test_topics_create_on_tansu(tansu: Any, stack_on: Callable[..., LoopStack]) -> None:
    stack = stack_on(tansu)
    created = stack.cli("redis-retry", "topics", "create", "--replication-factor", "1", "--partitions", "5")
    assert created.returncode == 0, created.stderr
    ops_topic = _described(stack, stack.topic)[stack.topic]
    assert ops_topic is not None
    assert ops_topic.partitions == 5
    assert ops_topic.config["retention.ms"] == SEVEN_DAYS_MS
    again = stack.cli("redis-retry", "topics", "create", "--replication-factor", "1", "--partitions", "5")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("exists") == 5


def test_topics_create_on_the_dev_broker_says_it_creates_topics_itself(
    request: pytest.FixtureRequest, stack_on: Callable[..., LoopStack]
) -> None:
    dev_broker = request.getfixturevalue("kafka")  # the fixture's name is the module's
    refused = stack_on(dev_broker).cli("redis-retry", "topics", "create", "--replication-factor", "1")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "has no controller and cannot create topics" in refused.stderr


# -- a missing topic, seen by each role ---------------------------------------------------------


def test_bridge_exits_at_once_naming_the_missing_topic(apache_kafka: Any, stack_on: Callable[..., LoopStack]) -> None:
    stack = stack_on(apache_kafka)
    bootstrap = apache_kafka.bootstrap_servers

    def bridge() -> CeleryCommand:
        command = CeleryCommand("loop_app", ["redis-retry", "bridge"], env=stack.env, cwd=str(stack.workdir),
                                log_dir=stack.workdir)
        stack.bridges.append(command)
        return command.start()

    first = bridge()
    code, seconds = _exit_of(first, 15)
    assert code == 5, first.log_tail()
    assert (f"cannot start the bridge: retry topic '{stack.topic}' does not exist on {bootstrap}; "
            f"{CREATE_HINT}") in first.log_text()
    print(f"bridge exited {seconds:.1f} s after start on a missing retry topic")

    apache_kafka.create_topic(stack.topic, partitions=2)
    second = bridge()
    code, _ = _exit_of(second, 15)
    assert code == 5, second.log_tail()
    assert f"DLQ topic '{stack.dlq_topic}' does not exist on {bootstrap}; {CREATE_HINT}" in second.log_text()

    apache_kafka.create_topic(stack.dlq_topic, partitions=1)
    ends = bridge()
    code, _ = _exit_of(ends, 15)
    assert code == 5, ends.log_tail()
    assert f"ends topic '{stack.ends_topic}' does not exist on {bootstrap}; {CREATE_HINT}" in ends.log_text()

    apache_kafka.create_topic(stack.ends_topic, partitions=1)
    third = bridge()
    code, _ = _exit_of(third, 15)
    assert code == 5, third.log_tail()
    waiting = f"{stack.topic}.waiting.default"
    assert f"waiting (default) topic '{waiting}' does not exist on {bootstrap}; {CREATE_HINT}" in third.log_text()

    apache_kafka.create_topic(waiting, partitions=2)
    fourth = bridge()
    fourth.wait_for_log(r"bridge consuming", timeout=60)  # all exist: the same command now runs
    assert fourth.running


def test_producer_spools_and_names_the_missing_topic(
    apache_kafka: Any, stack_on: Callable[..., LoopStack], caplog: pytest.LogCaptureFixture
) -> None:
    stack = stack_on(apache_kafka)
    producer = RetryProducer(stack.settings(), handle_sigterm=False)
    caplog.set_level(logging.INFO, logger="celery_redis_retry.capture.producer")
    published = [ops.set(f"key-{i}", i) for i in range(200)]
    started = time.monotonic()
    for op in published:
        producer.publish(op)

    def errors() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.levelno == logging.ERROR and stack.topic in r.getMessage()]

    wait_until(lambda: producer.spool.count() == len(published), 15, what="every op in the spool")
    noticed = time.monotonic() - started
    assert producer.topic_missing == stack.topic
    health = producer.health()
    assert health["state"] == "topic_missing"
    assert health["spool_messages"] == len(published)
    wait_until(errors, 5, what="the ERROR naming the topic")
    assert f"retry topic '{stack.topic}' does not exist on {apache_kafka.bootstrap_servers}; create it with: " \
           f"celery -A <app> redis-retry topics create" in errors()[0].getMessage()
    # More ops and several lookups later: still one line, not one per op or per lookup.
    timings = []
    for i in range(50):
        before = time.perf_counter()
        producer.publish(ops.set(f"late-{i}", i))
        timings.append(time.perf_counter() - before)
    time.sleep(5)
    assert len(errors()) == 1
    assert producer.spool.count() == 250
    median = sorted(timings)[len(timings) // 2]
    print(f"missing topic noticed {noticed:.1f} s after the first publish; "
          f"median publish while it is missing {median * 1e6:.0f} us")

    # The admin step runs: everything reaches Kafka, nothing was lost.
    apache_kafka.create_topic(stack.topic, partitions=2)
    wait_until(lambda: producer.spool.count() == 0, 30, what="the spool to drain")
    assert producer.topic_missing is None
    # The drain loop says "publishing" on its next look at the empty spool, just after
    # the last batch's removal that the count above saw.
    wait_until(lambda: producer.health()["state"] == "publishing", 5, what="publishing again")
    records = read_topic(apache_kafka.bootstrap_servers, stack.topic, count=250, timeout=30)
    assert len(records) == 250
    producer.close(5)


def test_operator_commands_name_the_missing_topic(apache_kafka: Any, stack_on: Callable[..., LoopStack]) -> None:
    stack = stack_on(apache_kafka)
    bootstrap = apache_kafka.bootstrap_servers
    started = time.monotonic()
    status = stack.cli("redis-retry", "status")
    status_seconds = time.monotonic() - started
    assert status.returncode == 5, status.stdout + status.stderr
    assert f"error        retry topic '{stack.topic}' does not exist on {bootstrap}; {CREATE_HINT}" in status.stderr
    assert f"error        DLQ topic '{stack.dlq_topic}' does not exist on {bootstrap}; {CREATE_HINT}" in status.stderr
    assert "lag unknown" in status.stdout
    assert status_seconds < 15

    commands = [("dlq", "list"), ("dlq", "show", "0:0"), ("dlq", "replay", "--all"), ("dlq", "purge", "--all", "--yes")]
    for args in commands:
        started = time.monotonic()
        done = stack.cli("redis-retry", *args)
        seconds = time.monotonic() - started
        assert done.returncode == 5, (args, done.stdout, done.stderr)
        assert f"error: DLQ topic '{stack.dlq_topic}' does not exist on {bootstrap}; {CREATE_HINT}" in done.stderr
        assert seconds < 15, (args, seconds)
    print(f"status answered in {status_seconds:.1f} s on missing topics")

    stack.cli("redis-retry", "topics", "create", "--replication-factor", "1")
    healthy = stack.cli("redis-retry", "status")
    assert healthy.returncode == 0, healthy.stderr
    listed = stack.cli("redis-retry", "dlq", "list")
    assert listed.returncode == 0, listed.stderr
    assert f"0 pending records in {stack.dlq_topic}" in listed.stdout


def test_a_dlq_topic_deleted_under_a_running_bridge_stalls_the_partition_and_says_why(
    apache_kafka: Any, stack_on: Callable[..., LoopStack]
) -> None:
    stack = stack_on(apache_kafka)
    assert stack.cli("redis-retry", "topics", "create", "--replication-factor", "1", "--partitions", "1",
                     "--dlq-partitions", "1").returncode == 0
    bridge = stack.start_bridge()
    stack.wait_assigned(bridge)
    admin = kafka.new_admin(stack.settings().kafka)
    for future in admin.delete_topics([stack.dlq_topic], operation_timeout=30).values():
        future.result()
    wait_until(lambda: _described(stack, stack.dlq_topic)[stack.dlq_topic] is None, 30, what="the DLQ topic gone")

    producer = kafka.new_producer(stack.settings().kafka)
    producer.produce(stack.topic, os.urandom(64), b"poison")  # rejected: it must go to the DLQ
    assert producer.flush(10) == 0
    bridge.wait_for_log(re.escape(f"DLQ topic '{stack.dlq_topic}' does not exist on "
                                  f"{apache_kafka.bootstrap_servers}") + r".*partition paused", timeout=30)

    # Recreated: the stalled partition is tried again and the record reaches the DLQ.
    apache_kafka.create_topic(stack.dlq_topic, partitions=1)
    records = read_topic(apache_kafka.bootstrap_servers, stack.dlq_topic, count=1, timeout=60)
    assert len(records) == 1
    assert records[0].headers["crr-outcome"] == b"rejected"
