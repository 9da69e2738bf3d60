"""An operator changes the retry policy at run time: ops already in flight follow the new rule.

Real processes: the embedded Kafka broker, a redis-server target that refuses writes
with OOM (a retryable failure of the op, not an outage: each one spends an attempt), a
``celery worker`` (prefork) and a ``redis-retry bridge``, driven through the real
``redis-retry policy`` and ``status`` commands.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery
from loop_stack import LoopStack

from celery_redis_retry import control, ops
from celery_redis_retry.bridge.loop import Bridge
from celery_redis_retry.config import settings_for
from celery_redis_retry.message import message_key
from celery_redis_retry.retry_policy import PolicyRule
from celery_redis_retry.testing import wait_until

pytestmark = pytest.mark.slow

#: Refuse every write with OOM, as test_loop does: PING answers, so it is no outage.
FULL = ("--maxmemory", "1", "--maxmemory-policy", "noeviction")
RULE = ("policy", "set", "sessions", "--key", "session:*", "--max-retries", "50", "--backoff", "0.2",
        "--backoff-max", "0.5")


def _memory(stack: LoopStack, limit: int) -> None:
    with stack.client() as r:
        r.config_set("maxmemory", limit)


def _all_applied(stack: LoopStack, keys: list[str]) -> None:
    with stack.client() as r:
        stack.wait_for(lambda: r.mget(keys) == [b"1"] * len(keys), 30, "every op applied")


def test_a_rule_set_at_run_time_governs_ops_in_flight_and_new_processes(
    make_loop: Callable[..., LoopStack],
) -> None:
    # Two retries, slowly: without the rule every op would be dead after its third attempt.
    stack = make_loop(target_args=FULL, max_retries=2, backoff=4.0, backoff_max=8.0)
    worker = stack.start_worker()
    bridge = stack.start_bridge()
    stack.wait_assigned(bridge)
    keys = [f"session:{i}" for i in range(8)]
    stack.publish_all([ops.incrby(key, 1) for key in keys])
    # The first attempt runs in a batch (it logs nothing); the second is a replay task of its own.
    worker.wait_for_log(r"attempt 2/3 failed \(OutOfMemoryError\)", timeout=30)

    stored = stack.cli("redis-retry", *RULE)
    assert stored.returncode == 0, stored.stdout + stored.stderr
    assert stored.stdout.startswith("rule sessions (order 100): key=session:* -> max_retries=50 backoff=0.2 "
                                    "backoff_max=0.5, set by "), stored.stdout
    # Ops held as countdown tasks, or queued, at their old limit: their next attempts follow the rule.
    worker.wait_for_log(r"attempt [4-9]/51 failed", timeout=30)
    assert stack.worker_log_count(r"RetriesExhaustedError") == 0
    _memory(stack, 0)
    _all_applied(stack, keys)
    assert stack.dlq_is_empty(settle=1), "an op in flight was dead-lettered at the old limit"

    listed = json.loads(stack.cli("redis-retry", "policy", "list", "--json").stdout)
    assert [(r["name"], r["key"], r["max_retries"]) for r in listed] == [("sessions", "session:*", 50)]
    text = stack.cli("redis-retry", "status").stdout
    assert "rule         sessions (order 100): key=session:* -> max_retries=50" in text, text
    assert json.loads(stack.cli("redis-retry", "status", "--json").stdout)["rules"][0]["name"] == "sessions"

    # New processes read the rule back from the control topic when they start.
    stack.stop()
    _memory(stack, 1)
    worker = stack.start_worker()
    bridge = stack.start_bridge()
    bridge.wait_for_log(r"retry policy rule sessions \(order 100\): key=session:\* -> max_retries=50 .* in force",
                        timeout=30)
    worker.wait_for_log(r"retry policy rule sessions \(order 100\): key=session:\* -> max_retries=50 .* in force",
                        timeout=30)
    stack.wait_assigned(bridge)
    late = stack.publish_all([ops.incrby("session:late", 1)])[0]
    worker.wait_for_log(rf"op {re.escape(late.id)} attempt 2/51 failed", timeout=30)
    _memory(stack, 0)
    _all_applied(stack, ["session:late"])

    # A rule's deadline ends ops at the bridge, before any hand-over.
    short = stack.cli("redis-retry", "policy", "set", "stale", "--key", "stale:*", "--deadline", "0", "--order", "1")
    assert short.returncode == 0, short.stderr
    bridge.wait_for_log(r"retry policy rule stale .* in force", timeout=10)
    stale = stack.publish_all([ops.incrby("stale:1", 1)])[0]
    bridge.wait_for_log(rf"op {re.escape(stale.id)} expired: deadline of retry policy rule stale passed", timeout=30)
    assert stack.worker_log_count(re.escape(stale.id)) == 0
    assert stack.cli("redis-retry", "policy", "delete", "stale").returncode == 0

    deleted = stack.cli("redis-retry", "policy", "delete", "sessions")
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.startswith("rule sessions deleted (it was: sessions (order 100): key=session:*")
    again = stack.cli("redis-retry", "policy", "delete", "sessions")
    assert again.returncode == 1
    assert "no retry policy rule named 'sessions' (see: redis-retry policy list)" in again.stderr
    assert stack.cli("redis-retry", "policy", "list").stdout.startswith("no retry policy rule in force")


@pytest.mark.parametrize(("args", "message"), [
    (("--target", "nope", "--max-retries", "1"), "target: unknown target 'nope'"),
    (("--command", "GET", "--max-retries", "1"), "command: 'GET' is not a Redis write command"),
    (("--key", "session:*"), "rule 'r' has no effect"),
    (("--priority", "urgent"), "priority: 'urgent' is not one of critical, ordinary"),
    (("--backoff-max", "7200"), "backoff_max (7200 s) must be below the Celery broker's"),
])
def test_an_invalid_rule_exits_2_naming_the_field(
    make_loop: Callable[..., LoopStack], args: tuple[str, ...], message: str,
) -> None:
    stack = make_loop()
    refused = stack.cli("redis-retry", "policy", "set", "r", *args)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert message in refused.stderr
    assert "Traceback" not in refused.stderr


def test_a_bridges_watch_follows_rules_set_and_deleted_after_it_started(kafka: Any) -> None:
    app = Celery("policy-watch", broker="memory://", set_as_current=False)
    app.conf.update(
        redis_retry_kafka=dict(kafka.config),
        redis_retry_targets={"default": "redis://127.0.0.1:1/0"},
        redis_retry_topic=f"ops-{uuid.uuid4().hex[:10]}",
    )
    settings = settings_for(app)
    control.set_policy(settings, PolicyRule("before", key="session:*", max_retries=9, order=50), by="a@h1")
    bridge = Bridge(app)
    bridge.pauses.start(wait=10)
    try:
        session, other = ops.set("session:1", "v"), ops.set("user:1", "v")
        assert bridge.pauses.rules().decide(session).max_retries == 9, "a rule written before the bridge started"
        assert bridge.priority_of(session) is None
        control.set_policy(settings, PolicyRule("urgent", key="session:*", priority="critical", order=10))
        wait_until(lambda: bridge.priority_of(session) == "critical", 10, what="the new rule seen")
        # ...and the bridge's lanes ask the rules: a session op read now goes in the critical lane.
        assert bridge._lanes.lane(message_key(session), session, settings.topic, 0, 0) == "critical"
        assert bridge._lanes.lane(message_key(other), other, settings.topic, 0, 1) is None
        assert bridge.priority_of(other) is None
        assert bridge.pauses.rules().decide(session).max_retries == settings.max_retries  # only the winner counts
        assert set(control.read_policies(settings, timeout=10)) == {"before", "urgent"}
        control.delete_policy(settings, "urgent")
        wait_until(lambda: bridge.priority_of(session) is None, 10, what="the deletion seen")
        assert bridge.pauses.rules().decide(session).rule == "before"
        with pytest.raises(control.UnknownPolicyError, match="no retry policy rule named 'urgent'"):
            control.delete_policy(settings, "urgent")
    finally:
        bridge.pauses.stop()
