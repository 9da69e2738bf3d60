"""Retry policy rules: matching, precedence, validation (pure, no I/O)."""

from __future__ import annotations

import pytest

from celery_redis_retry import ops
from celery_redis_retry.config import Settings
from celery_redis_retry.errors import PolicyRuleError
from celery_redis_retry.expiry import expired
from celery_redis_retry.policy import Backoff
from celery_redis_retry.retry_policy import PolicyRecord, PolicyRule, PolicyRules

SETTINGS = Settings.from_mapping({
    "redis_retry_kafka": {"bootstrap.servers": "localhost:9092"},
    "redis_retry_targets": {"default": "redis://localhost:6379/0", "cache": "redis://localhost:6380/0"},
    "redis_retry_max_retries": 3,
})


def rules(*given: PolicyRule) -> PolicyRules:
    return PolicyRules.of(given, SETTINGS)


# -- matching ------------------------------------------------------------------------------


def test_a_rule_without_matchers_matches_every_op() -> None:
    rule = PolicyRule("all", max_retries=9)
    assert rule.matches(ops.set("a", "1"))
    assert rule.matches(ops.script("bump", keys=["k"]).with_target("cache"))


def test_each_matcher_must_match() -> None:
    rule = PolicyRule("r", target="default", command="hset", key="session:*", source="web-*", max_retries=9)
    op = ops.hset("session:1", "f", "v").with_source("web-1")
    assert rule.command == "HSET"  # upper-cased
    assert rule.matches(op)
    assert not rule.matches(op.with_target("cache"))
    assert not rule.matches(ops.set("session:1", "v").with_source("web-1"))
    assert not rule.matches(ops.hset("user:1", "f", "v").with_source("web-1"))
    assert not rule.matches(ops.hset("session:1", "f", "v").with_source("batch"))
    assert not rule.matches(ops.hset("session:1", "f", "v"))  # no source at all


def test_command_matches_any_command_of_a_pipeline() -> None:
    pipe = ops.pipeline([ops.set("a", "1"), ops.incrby("n")])
    assert PolicyRule("r", command="INCRBY", max_retries=1).matches(pipe)
    assert not PolicyRule("r", command="DEL", max_retries=1).matches(pipe)


def test_key_glob_is_bytes_safe() -> None:
    op = ops.set(b"session:\xff\xfe", "1")
    assert PolicyRule("r", key="session:*", max_retries=1).matches(op)
    assert not PolicyRule("r", key="user:*", max_retries=1).matches(op)
    assert PolicyRule("r", key="user:?", max_retries=1).matches(ops.set("user:7", "1"))


# -- precedence ----------------------------------------------------------------------------


def test_without_a_matching_rule_the_op_and_settings_decide() -> None:
    decision = rules(PolicyRule("other", key="user:*", max_retries=50)).decide(ops.set("a", "1").with_max_retries(7))
    assert (decision.max_retries, decision.rule, decision.deadline, decision.priority) == (7, None, None, None)
    assert decision.backoff == SETTINGS.backoff
    assert rules().decide(ops.set("a", "1")).max_retries == 3


def test_the_lowest_order_wins_then_the_name() -> None:
    op = ops.set("session:1", "v")
    given = rules(PolicyRule("b", max_retries=2, order=10), PolicyRule("a", max_retries=1, order=10),
                  PolicyRule("z", max_retries=0, order=5))
    assert given.decide(op).rule == "z"
    assert rules(*given.rules[1:]).decide(op).rule == "a"


def test_the_winning_rule_beats_the_ops_own_values_and_leaves_the_rest() -> None:
    op = ops.set("session:1", "v").with_max_retries(1).with_deadline(5)
    decision = rules(PolicyRule("s", key="session:*", max_retries=20, backoff=0.5)).decide(op)
    assert decision.max_retries == 20
    assert decision.backoff == Backoff(0.5, SETTINGS.backoff.maximum, SETTINGS.backoff.jitter)
    assert decision.deadline is None  # unset by the rule: the op's own deadline still counts
    assert expired(op, op.created_at + 6, decision=decision) is not None
    assert decision.countdown(3, rand=lambda: 1.0) == 4.0


def test_a_rule_deadline_replaces_the_ops_deadline_and_max_age() -> None:
    op = ops.set("a", "1").with_deadline(5)
    decision = rules(PolicyRule("long", deadline=3600, priority="critical")).decide(op)
    assert decision.deadline == op.created_at + 3600
    assert decision.priority == "critical"
    assert expired(op, op.created_at + 60, max_age=30, decision=decision) is None
    why = expired(op, op.created_at + 3601, max_age=30, decision=decision)
    assert why is not None
    assert "rule long" in why


def test_backoff_max_caps_the_countdown() -> None:
    decision = rules(PolicyRule("cap", backoff=2, backoff_max=5)).decide(ops.set("a", "1"))
    assert decision.countdown(10, rand=lambda: 1.0) == 5.0


def test_records_round_trip() -> None:
    record = PolicyRecord(PolicyRule("s", key="session:*", max_retries=5, order=7), "ops@host", 12.5)
    assert PolicyRecord.decode(record.encode()) == record


# -- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(("fields", "message"), [
    ({"name": "bad name", "max_retries": 1}, "name: 'bad name' may only hold letters, digits and _ . : -"),
    ({"name": "r", "command": "GET", "max_retries": 1}, "command: 'GET' is not a Redis write command"),
    ({"name": "r", "key": "session:[ab", "max_retries": 1}, "key: 'session:[ab' opens a [ set it does not close"),
    ({"name": "r", "source": "", "max_retries": 1}, "source: an empty pattern matches nothing"),
    ({"name": "r", "max_retries": -1}, "max_retries: must not be negative, got -1"),
    ({"name": "r", "backoff": -2}, "backoff: must not be negative, got -2"),
    ({"name": "r", "deadline": -1.5}, "deadline: must not be negative, got -1.5"),
    ({"name": "r", "priority": "urgent"}, "priority: 'urgent' is not one of critical, ordinary"),
    ({"name": "r", "key": "session:*"}, "rule 'r' has no effect: give one of max_retries"),
    ({"name": "r", "max_retries": "5"}, "max_retries: must be a whole number, got '5'"),
    ({"name": "r", "deadline": "soon"}, "deadline: must be a number of seconds, got 'soon'"),
    ({"name": "r", "retries": 5}, "unknown field(s) of a retry policy rule: retries"),
    ({"max_retries": 5}, "name: a retry policy rule needs a name"),
])
def test_invalid_rules_are_refused_naming_the_field(fields: dict[str, object], message: str) -> None:
    with pytest.raises(PolicyRuleError) as raised:
        PolicyRule.parse(fields)
    assert message in str(raised.value)


def test_check_refuses_an_unknown_target() -> None:
    with pytest.raises(PolicyRuleError, match=r"target: unknown target 'nope': redis_retry_targets names cache, "):
        PolicyRule("r", target="nope", max_retries=1).check(SETTINGS)


def test_check_refuses_a_backoff_max_the_broker_would_redeliver() -> None:
    conf = {"broker_url": "redis://localhost:6379/1", "broker_transport_options": {"visibility_timeout": 600}}
    with pytest.raises(PolicyRuleError, match=r"backoff_max \(900 s\) must be below the Celery broker's"):
        PolicyRule("r", backoff_max=900).check(SETTINGS, conf)
    PolicyRule("r", backoff_max=300).check(SETTINGS, conf)
    PolicyRule("r", backoff_max=900).check(SETTINGS, {"broker_url": "amqp://localhost//"})
