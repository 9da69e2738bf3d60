"""What an operator reads during an outage: few lines, and true ones.

librdkafka retries a lost broker every few tens of milliseconds and logs each failure;
these tests hold the process to one line when a broker goes, one when it is back, and a
count of the failures in between at most once a minute.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import signal
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from loop_stack import APPS_DIR, LoopStack

from celery_redis_retry import message, ops
from celery_redis_retry.kafka.log import LibrdkafkaLog
from celery_redis_retry.outage_log import UnknownTargetLog
from celery_redis_retry.testing import ManagedProcess, TansuKafka, free_port, read_topic, wait_until

pytestmark = pytest.mark.slow

REFUSED = "[thrd:127.0.0.1:9092/bootstrap]: 127.0.0.1:9092/bootstrap: Connect to ipv4#127.0.0.1:9092 failed: " \
          "Connection refused (after 0ms in state CONNECT)"
UP = '{"brokers": {"127.0.0.1:9092/1": {"nodename": "127.0.0.1:9092", "state": "UP"}}}'


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def quiet(caplog: pytest.LogCaptureFixture) -> tuple[LibrdkafkaLog, Clock]:
    caplog.set_level(logging.DEBUG, logger="test.librdkafka")
    clock = Clock()
    return LibrdkafkaLog(logging.getLogger("test.librdkafka"), clock=clock), clock


def test_a_broker_refusing_connections_is_one_warning_then_a_count_a_minute_then_one_info(
    quiet: tuple[LibrdkafkaLog, Clock], caplog: pytest.LogCaptureFixture
) -> None:
    log, clock = quiet
    for _ in range(500):  # 30 s of a reconnect every 60 ms
        log.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#consumer-1", REFUSED)
        clock.now += 0.06
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "Kafka broker 127.0.0.1:9092 unreachable: Connect to ipv4#127.0.0.1:9092 failed: Connection "
                    "refused (further failures are counted, told once a minute)"),
    ]
    assert log.unreachable == ["127.0.0.1:9092"]
    clock.now += 31
    log.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#producer-2", REFUSED)
    assert "still unreachable after 61 s: 500 more failures in the last 61 s" in caplog.records[-1].getMessage()
    log.statistics('{"brokers": {"127.0.0.1:9092/1": {"nodename": "127.0.0.1:9092", "state": "CONNECT"}}}')
    assert len(caplog.records) == 2
    clock.now += 4
    log.statistics(UP)
    assert (caplog.records[-1].levelname, caplog.records[-1].getMessage()) == (
        "INFO", "Kafka broker 127.0.0.1:9092 reachable again after 65 s (501 failures)")
    assert log.unreachable == []
    log.log(logging.ERROR, "%s [%s] %s", "FAIL", "rdkafka#consumer-1", REFUSED)  # a new outage: said again
    assert len(caplog.records) == 4
    assert "unreachable" in caplog.records[-1].getMessage()


def test_another_repeated_line_is_told_once_a_minute_with_its_count(
    quiet: tuple[LibrdkafkaLog, Clock], caplog: pytest.LogCaptureFixture
) -> None:
    log, clock = quiet
    timeout = "[thrd:main]: Consumer group session timed out after {} ms"
    for client in range(3):
        log.log(logging.WARNING, "%s [%s] %s", "SESSTMOUT", f"rdkafka#consumer-{client}", timeout.format(6000 + client))
    log.log(logging.WARNING, "%s [%s] %s", "OTHER", "rdkafka#consumer-1", "something else")
    assert [r.getMessage() for r in caplog.records] == [
        "SESSTMOUT [rdkafka#consumer-0] [thrd:main]: Consumer group session timed out after 6000 ms",
        "OTHER [rdkafka#consumer-1] something else",
    ]
    clock.now += 60
    log.log(logging.WARNING, "%s [%s] %s", "SESSTMOUT", "rdkafka#consumer-1", timeout.format(6001))
    assert caplog.records[-1].getMessage().endswith("(2 more like it in the last 60 s)")
    assert caplog.records[-1].levelname == "WARNING"


@pytest.mark.extended  # the chaos run plays this fault with full accounting in make test
def test_a_bridge_whose_kafka_stops_for_60_s_says_so_in_few_lines_and_reconnects(
    make_loop: Callable[..., LoopStack], tmp_path: Path
) -> None:
    broker = TansuKafka(log_dir=tmp_path).start()
    try:
        stack = make_loop(kafka_broker=broker)
        bridge = stack.start_bridge()
        stack.wait_assigned(bridge)
        time.sleep(1)  # the waiting topic's assignment is logged just after
        since = bridge.mark()
        broker.stop()
        bridge.wait_for_log(r"Kafka broker \S+ unreachable", timeout=20, since=since)
        time.sleep(60)
        during = [line for line in bridge.log_text(since).splitlines()
                  if not re.search(r"bridge: \d+ dispatched", line)]  # the periodic report, about nothing here
        assert len(during) < 10, "\n".join(during)
        assert bridge.running

        broker.start()  # Tansu keeps no data across a restart: the topics are made again
        stack.create_topics()
        back = bridge.mark()
        bridge.wait_for_log(r"Kafka broker 127\.0\.0\.1:\d+ reachable again after \d+ s \(\d+ failures\)",
                            timeout=60, since=since)
        stack.wait_assigned(bridge, timeout=60)
        assert bridge.running
        # librdkafka hands its log lines over when a client is polled: one queued before the
        # restart may still come out just after it. Once partitions are assigned, none may.
        settled = bridge.mark()
        time.sleep(6)
        from_librdkafka = re.findall(r"celery_redis_retry\.librdkafka", bridge.log_text(since))
        assert len(from_librdkafka) <= 6, bridge.log_text(since)
        assert "Connection refused" not in bridge.log_text(settled), bridge.log_text(back)
    finally:
        broker.stop()


def test_ops_for_a_target_the_app_does_not_define_are_told_once_then_every_10_minutes_with_a_count(
    quiet: tuple[LibrdkafkaLog, Clock], caplog: pytest.LogCaptureFixture
) -> None:
    _, clock = quiet
    told = UnknownTargetLog(logging.getLogger("test.librdkafka"), "redis-retry-queue", clock=clock)
    for _ in range(50):
        told.met("billing")
        clock.now += 10
    told.met("sessions")
    assert len(caplog.records) == 2
    assert caplog.records[0].getMessage() == (
        "ops for target 'billing' which this app does not define (they go to the DLQ as rejected): another app "
        "may publish to topic redis-retry-queue; give each app its own redis_retry_topic and "
        "redis_retry_consumer_group")
    assert "'sessions'" in caplog.records[1].getMessage()
    clock.now += 100  # 10 minutes after the first
    told.met("billing")
    assert len(caplog.records) == 3
    assert "(50 more in the last 10 min, 51 since the first; they go to the DLQ as rejected)" in \
        caplog.records[2].getMessage()


def test_a_bridge_meeting_ops_of_a_target_it_does_not_define_says_so_once_and_rejects_each(
    make_loop: Callable[..., LoopStack],
) -> None:
    stack = make_loop()
    bridge = stack.start_bridge()
    stack.wait_assigned(bridge)
    # Another app on the same topic, with a target this one does not define.
    other = dataclasses.replace(stack, extra_targets={"billing": stack.target.url}, bridges=[])
    try:
        other.publish_all([ops.set(f"invoice:{n}", n).with_target("billing") for n in range(5)])
        letters = stack.dead_letters(count=5)
    finally:
        other.stop()
    assert [(d.outcome, d.reason) for d in letters] == [("rejected", "unknown_target")] * 5
    said = re.findall(r"WARNING.*which this app does not define.*", bridge.log_text())
    assert len(said) == 1, bridge.log_text()
    assert f"ops for target 'billing' which this app does not define (they go to the DLQ as rejected): another " \
           f"app may publish to topic {stack.topic}; give each app its own redis_retry_topic and " \
           f"redis_retry_consumer_group" in said[0]
    assert not re.search(r"WARNING.*rejected: op", bridge.log_text())  # not one line per op


def test_sigterm_and_sigint_stop_a_busy_bridge_without_a_traceback(make_loop: Callable[..., LoopStack]) -> None:
    stack = make_loop()
    stack.start_worker(concurrency=1)
    for number, stop in enumerate((signal.SIGTERM, signal.SIGINT)):
        bridge = stack.start_bridge()
        stack.wait_assigned(bridge)
        stack.publish_all([ops.incrby(f"visits:{number}", 1) for _ in range(200)])
        assert bridge.pid is not None
        os.killpg(bridge.pid, stop)
        assert bridge.stop(timeout=30) == 0, bridge.log_tail()
        assert "Traceback" not in bridge.log_text(), bridge.log_text()
        assert " raised" not in bridge.log_text()
    assert stack.worker is not None
    assert "Traceback" not in stack.worker.log_text()


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGTERM-app-handler", "SIGINT-twice"])
def test_an_app_spooling_through_a_kafka_outage_stops_without_a_traceback(tmp_path: Path, stop: str) -> None:
    """The publishing process, its main thread inside spool transactions most of the time
    (Kafka refuses, ``redis_retry_durable_publish``), stopped by a signal: nothing but the
    app's own lines, and every op it published is in the spool."""
    out = tmp_path / "published.jsonl"
    env = {"CRR_BOOTSTRAP": f"127.0.0.1:{free_port()}", "CRR_TOPIC": "quiet", "CRR_SPOOL": str(tmp_path / "spool"),
           "CRR_DURABLE": "1", "PYTHONPATH": str(APPS_DIR)}
    args = ["--then", "forever", *(["--exit-on-sigterm"] if stop == "SIGTERM-app-handler" else [])]
    app = ManagedProcess([sys.executable, str(APPS_DIR / "durability_publisher.py"), "--out", str(out), *args],
                         env=env, cwd=str(APPS_DIR), name="publisher", log_dir=tmp_path).start()
    try:
        app.wait_until(lambda: out.exists() and out.stat().st_size > 0, 30, "ops published")
        time.sleep(1)
        assert app.pid is not None
        if stop == "SIGINT-twice":
            os.kill(app.pid, signal.SIGINT)
            os.kill(app.pid, signal.SIGINT)
        else:
            os.kill(app.pid, signal.SIGTERM)
        wait_until(lambda: not app.running, 30, what="the app to exit")
        code = app.returncode
    finally:
        app.kill()
    output = app.log_text()
    published = out.read_bytes().count(b"\n")
    with contextlib.closing(sqlite3.connect(tmp_path / "spool")) as spool:
        spooled = spool.execute("SELECT count(*) FROM spool").fetchone()[0]
    assert spooled >= published > 0  # Kafka refused them all: each publish that returned is in the spool
    if stop == "SIGINT-twice":  # the script does not catch Ctrl-C: Python's one traceback is the script's
        assert output.count("Traceback") <= 1, output
        assert output.rstrip().endswith("KeyboardInterrupt") or "Traceback" not in output, output
    else:
        assert "Traceback" not in output, output
        assert code == (0 if stop == "SIGTERM-app-handler" else -signal.SIGTERM), output
    assert "closing a producer failed" not in output
    assert "LOST" not in output


def test_ctrl_c_twice_while_the_app_flushes_to_a_stalled_kafka_spools_the_rest_without_a_second_traceback(
    tmp_path: Path,
) -> None:
    """Ctrl-C ends the app (its own KeyboardInterrupt traceback); the producers then flush at
    exit, for up to 5 s while Kafka does not answer; a second Ctrl-C stops that wait: what
    Kafka had not confirmed is spooled, and nothing else is printed."""
    broker = TansuKafka(log_dir=tmp_path).start()
    broker.create_topic("stalled")
    out, spool = tmp_path / "published.jsonl", tmp_path / "spool.sqlite3"
    env = {"CRR_BOOTSTRAP": broker.bootstrap_servers, "CRR_TOPIC": "stalled", "CRR_SPOOL": str(spool),
           "PYTHONPATH": str(APPS_DIR)}
    app = ManagedProcess([sys.executable, str(APPS_DIR / "durability_publisher.py"), "--out", str(out),
                          "--then", "forever", "--rate", "2000"], env=env, cwd=str(APPS_DIR), name="publisher",
                         log_dir=tmp_path).start()
    try:
        app.wait_until(lambda: out.exists() and out.stat().st_size > 0, 30, "ops published")
        assert app.pid is not None
        assert broker.pid is not None
        os.kill(broker.pid, signal.SIGSTOP)  # Kafka stalls: deliveries wait, no error ends them
        time.sleep(0.5)
        os.kill(app.pid, signal.SIGINT)
        time.sleep(1.0)  # the app flushes at exit meanwhile
        os.kill(app.pid, signal.SIGINT)
        wait_until(lambda: not app.running, 15, what="the app to exit")
    finally:
        app.kill()
        if broker.pid is not None:
            os.kill(broker.pid, signal.SIGCONT)
    output = app.log_text()
    assert output.count("Traceback") == 1, output  # the script's own, for the first Ctrl-C
    assert "Exception ignored" not in output, output
    published = {message.decode(line).id for line in out.read_bytes().splitlines()}
    with contextlib.closing(sqlite3.connect(spool)) as db:
        spooled = {message.decode(value).id for (value,) in db.execute("SELECT value FROM spool")}
    assert spooled, output  # the wait was cut short: some ops were still Kafka's to confirm
    in_kafka = {message.decode(r.value or b"").id for r in read_topic(broker.config, "stalled", idle=2, timeout=60)}
    broker.stop()
    assert published <= spooled | in_kafka
