"""SASL/SCRAM over TLS end to end, with the least-privilege ACLs of docs/security.md.

One Apache Kafka broker with a SASL_SSL listener (certificates made by the test, SCRAM
users in the metadata log, ACLs enforced by StandardAuthorizer). The app's producer,
the bridge, the worker (its DLQ writer) and the operator commands each connect as
their own principal, granted only what docs/security.md lists.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest
from conftest import SCRAM_USERS
from loop_stack import LoopStack
from test_loop import outage_then_recovery

from celery_redis_retry import ops
from celery_redis_retry.config import waiting_topic_name
from celery_redis_retry.testing import ApacheKafka, CeleryCommand, wait_until

pytestmark = pytest.mark.slow

def grant_least_privilege(cluster: ApacheKafka, topic: str, group: str) -> None:
    """Exactly the ACLs docs/security.md lists: an ops topic, its DLQ, ends and waiting topics, the bridge's groups."""
    dlq = f"{topic}.dlq"
    waiting_topics = [waiting_topic_name(topic, "default")]
    cluster.allow("User:app", "topic", topic, "WRITE", "DESCRIBE")
    cluster.allow("User:bridge", "topic", topic, "READ", "DESCRIBE")
    cluster.allow("User:bridge", "group", group, "READ")
    cluster.allow("User:bridge", "topic", dlq, "WRITE", "DESCRIBE")
    cluster.allow("User:worker", "topic", dlq, "WRITE", "DESCRIBE")
    cluster.allow("User:worker", "topic", f"{topic}.ends", "WRITE", "DESCRIBE")
    cluster.allow("User:bridge", "topic", f"{topic}.ends", "READ", "DESCRIBE")
    for waiting in waiting_topics:
        cluster.allow("User:bridge", "topic", waiting, "READ", "WRITE", "DESCRIBE")
        cluster.allow("User:worker", "topic", waiting, "WRITE", "DESCRIBE")
        cluster.allow("User:operator", "topic", waiting, "DESCRIBE")
    cluster.allow("User:bridge", "group", f"{group}.waiting", "READ")
    cluster.allow("User:operator", "group", f"{group}.waiting", "DESCRIBE")
    cluster.allow("User:operator", "topic", topic, "WRITE", "DESCRIBE")
    cluster.allow("User:operator", "topic", dlq, "READ", "DESCRIBE")
    cluster.allow("User:operator", "group", group, "DESCRIBE")
    cluster.allow("User:operator", "group", f"{group}.dlq", "READ")
    cluster.allow("User:operator", "group", "celery-redis-retry-reader-", "READ", prefixed=True)


def secure_loop(make_loop: Callable[..., LoopStack], cluster: ApacheKafka, **options: object) -> LoopStack:
    roles = {role: {"sasl.username": role, "sasl.password": SCRAM_USERS[role]} for role in ("app", "bridge", "worker",
                                                                                       "operator")}
    stack = make_loop(kafka_broker=cluster.as_user("app"), kafka_roles=roles, **options)
    grant_least_privilege(cluster, stack.topic, f"group-{stack.name}")
    return stack


def test_the_loop_over_sasl_ssl_with_least_privilege_principals(
    make_loop: Callable[..., LoopStack], secure_kafka: ApacheKafka
) -> None:
    stack = secure_loop(make_loop, secure_kafka, target_running=False, max_retries=12, backoff=0.5,
                        backoff_max=4.0)
    outage_then_recovery(stack, 300)
    # A dead op: the worker's DLQ writer, as User:worker.
    stack.publish_all([ops.lpush("k:0", "x"), ops.sadd("k:0", "y")])
    letters = stack.dead_letters(count=1, timeout=60)
    assert letters[0].reason == "wrong_type"
    status = stack.cli("redis-retry", "status")
    assert status.returncode == 0, status.stdout + status.stderr
    listed = stack.cli("redis-retry", "dlq", "list")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert "wrong_type" in listed.stdout


def test_a_wrong_password_stops_the_bridge_naming_the_setting(
    make_loop: Callable[..., LoopStack], secure_kafka: ApacheKafka
) -> None:
    stack = secure_loop(make_loop, secure_kafka)
    stack.kafka_roles["bridge"]["sasl.password"] = "not-the-password"
    bridge = CeleryCommand("loop_app", ["redis-retry", "bridge"], env=stack.env_for("bridge"),
                           cwd=str(stack.workdir), log_dir=stack.workdir).start()
    started = time.monotonic()
    wait_until(lambda: not bridge.running, 60, what="the bridge to exit")
    took = time.monotonic() - started
    assert bridge.returncode == 3, bridge.log_tail()
    log = bridge.log_text()
    assert re.search(r"sasl\.password", log), log[-2000:]
    assert "authentication" in log.lower()
    print(f"\nbridge with a wrong password exited {bridge.returncode} after {took:.1f}s")
    stack.kafka_roles["operator"]["sasl.password"] = "not-the-password"
    for command in (["status"], ["dlq", "list"]):
        started = time.monotonic()
        done = stack.cli("redis-retry", *command)
        took = time.monotonic() - started
        assert done.returncode == 3, done.stdout + done.stderr
        assert "redis_retry_kafka['sasl.password']" in done.stderr, done.stderr
        print(f"`redis-retry {' '.join(command)}` with a wrong password exited 3 after {took:.1f}s")


def test_a_principal_without_write_access_gets_a_clear_error_and_keeps_the_op(
    make_loop: Callable[..., LoopStack], secure_kafka: ApacheKafka, caplog: pytest.LogCaptureFixture
) -> None:
    stack = secure_loop(make_loop, secure_kafka)
    stack.kafka_roles["app"] = {"sasl.username": "outsider", "sasl.password": SCRAM_USERS["outsider"]}
    op = ops.set("refused", "v")
    with caplog.at_level("ERROR", logger="celery_redis_retry"):
        stack.producer.publish(op)
        stack.producer.flush(30)
    assert stack.producer.spool.count() == 1, "the refused op is kept in the spool, not lost"
    errors = " ".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert stack.topic in errors, errors
    assert "WRITE" in errors, errors
    assert "User:outsider" in errors or "outsider" in errors, errors


def test_a_producer_with_a_wrong_password_keeps_its_ops_and_says_which_setting(
    make_loop: Callable[..., LoopStack], secure_kafka: ApacheKafka, caplog: pytest.LogCaptureFixture
) -> None:
    stack = secure_loop(make_loop, secure_kafka)
    stack.kafka_roles["app"] = {"sasl.username": "app", "sasl.password": "not-the-password"}
    with caplog.at_level("ERROR", logger="celery_redis_retry"):
        stack.producer.publish(ops.set("kept", "v"))
        wait_until(lambda: stack.producer.health()["state"] == "refused", 30, what="the refusal to be noticed")
        wait_until(lambda: stack.producer.spool.count() == 1, 30, what="the op to be in the spool")
    errors = " ".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert "redis_retry_kafka['sasl.password']" in errors, errors
