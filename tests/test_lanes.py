"""Critical ops: the op's priority, its wire field, the lane decision, the batches and queues of each lane."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from celery_redis_retry import ops
from celery_redis_retry.bridge.dispatch import Batcher, TaskSender
from celery_redis_retry.bridge.lanes import CRITICAL, ORDINARY, Lanes
from celery_redis_retry.bridge.offsets import Consumed, OffsetTracker
from celery_redis_retry.config import Settings
from celery_redis_retry.errors import ConfigurationError, DecodeError, EncodeError
from celery_redis_retry.message import decode, encode, message_key, op_document
from celery_redis_retry.replay.worker import lane_queue

TOPIC = "ops"

# -- the op and its wire field -------------------------------------------------------------


def test_an_op_is_ordinary_until_marked_critical_and_can_be_marked_back() -> None:
    op = ops.set("k", "v")
    assert op.priority is None
    critical = op.with_source("Checkout.pay").with_priority("critical")
    assert critical.priority == "critical"
    assert critical.source == "Checkout.pay"
    assert critical.with_priority(None).priority is None


@pytest.mark.parametrize("bad", ["high", "CRITICAL", "", 1])
def test_an_unknown_priority_is_refused_naming_it(bad: Any) -> None:
    with pytest.raises(EncodeError, match=f"priority must be 'critical' or None, got {bad!r}"):
        ops.set("k", "v").with_priority(bad)


def test_the_priority_travels_on_the_wire_and_back() -> None:
    op = ops.rpush("log", "a").with_priority("critical")
    raw = encode(op)
    assert b'"priority":"critical"' in raw
    assert decode(raw) == op
    assert op_document(op)["priority"] == "critical"
    assert decode(encode(op.with_priority(None))).priority is None


def test_a_message_written_before_priorities_reads_as_ordinary() -> None:
    raw = b'{"v":1,"id":"a-1","kind":"command","created_at":1.0,"cmds":[["SET","k","v"]]}'
    assert decode(raw).priority is None
    assert b"priority" not in encode(ops.set("k", "v"))  # ordinary ops are written as before


def test_an_unknown_priority_on_the_wire_is_refused_naming_the_field() -> None:
    raw = b'{"v":1,"id":"a-1","kind":"command","created_at":1.0,"cmds":[["SET","k","v"]],"priority":"high"}'
    with pytest.raises(DecodeError, match=r"priority"):
        decode(raw)


# -- the lane decision ---------------------------------------------------------------------


class _Ends:
    """Which positions ended, as the bridge's offset tracker would say."""

    def __init__(self) -> None:
        self.open: set[tuple[str, int, int]] = set()

    def is_open(self, topic: str, partition: int, offset: int) -> bool:
        return (topic, partition, offset) in self.open


def _read(lanes: Lanes, ends: _Ends, op: ops.RedisOp, offset: int) -> str | None:
    ends.open.add((TOPIC, 0, offset))
    return lanes.lane(message_key(op), op, TOPIC, 0, offset)


def test_each_op_takes_its_own_lane_when_no_op_of_its_key_is_open() -> None:
    ends = _Ends()
    lanes = Lanes(ends.is_open)
    assert _read(lanes, ends, ops.set("a", 1), 0) is ORDINARY
    assert _read(lanes, ends, ops.set("b", 1).with_priority("critical"), 1) == CRITICAL


def test_a_critical_op_stays_behind_an_open_ordinary_op_of_its_key() -> None:
    ends = _Ends()
    lanes = Lanes(ends.is_open)
    assert _read(lanes, ends, ops.set("k", 1), 0) is ORDINARY
    assert _read(lanes, ends, ops.set("k", 2).with_priority("critical"), 1) is ORDINARY  # sticky
    assert _read(lanes, ends, ops.set("other", 2).with_priority("critical"), 2) == CRITICAL
    ends.open -= {(TOPIC, 0, 0)}
    # Its own lane's op before it (offset 1) is still open: the lane stays put until that one ends.
    assert _read(lanes, ends, ops.set("k", 3).with_priority("critical"), 3) is ORDINARY
    ends.open -= {(TOPIC, 0, 1), (TOPIC, 0, 3)}
    assert _read(lanes, ends, ops.set("k", 4).with_priority("critical"), 4) == CRITICAL


def test_an_ordinary_op_stays_behind_an_open_critical_op_of_its_key() -> None:
    ends = _Ends()
    lanes = Lanes(ends.is_open)
    assert _read(lanes, ends, ops.set("k", 1).with_priority("critical"), 0) == CRITICAL
    assert _read(lanes, ends, ops.set("k", 2), 1) == CRITICAL
    ends.open.clear()
    assert _read(lanes, ends, ops.set("k", 3), 2) is ORDINARY


def test_keys_are_told_apart_by_target_too() -> None:
    ends = _Ends()
    lanes = Lanes(ends.is_open)
    assert _read(lanes, ends, ops.set("k", 1), 0) is ORDINARY
    assert _read(lanes, ends, ops.set("k", 1).with_target("cache").with_priority("critical"), 1) == CRITICAL


def test_the_rule_beats_the_ops_own_priority_and_none_leaves_it() -> None:
    ends = _Ends()
    lanes = Lanes(ends.is_open, lambda op: "critical" if str(op.first_key).startswith("pay:") else None)
    assert _read(lanes, ends, ops.set("pay:1", 1), 0) == CRITICAL
    assert _read(lanes, ends, ops.set("cart:1", 1), 1) is ORDINARY
    assert _read(lanes, ends, ops.set("cart:2", 1).with_priority("critical"), 2) == CRITICAL


def test_a_rule_giving_ordinary_puts_an_op_marked_critical_in_the_ordinary_lane() -> None:
    ends = _Ends()
    lanes = Lanes(ends.is_open, lambda op: "ordinary" if str(op.first_key).startswith("bulk:") else None)
    assert _read(lanes, ends, ops.set("bulk:1", 1).with_priority("critical"), 0) is ORDINARY
    assert _read(lanes, ends, ops.set("pay:1", 1).with_priority("critical"), 1) == CRITICAL


def test_entries_of_ended_ops_are_forgotten_by_a_sweep() -> None:
    ends = _Ends()
    lanes = Lanes(ends.is_open)
    for offset in range(5):
        _read(lanes, ends, ops.set(f"k{offset}", 1), offset)
    assert len(lanes) == 5
    ends.open -= {(TOPIC, 0, 0), (TOPIC, 0, 3)}
    assert lanes.forget_ended() == 3
    assert lanes.forget_ended() == 3
    ends.open.clear()
    assert lanes.forget_ended() == 0


def test_the_offset_tracker_says_open_until_the_op_ended_or_its_partition_was_revoked() -> None:
    tracker = OffsetTracker(hold_until_end=True)
    item = Consumed(TOPIC, 0, 7, "m", ops.set("k", 1))
    assert not tracker.is_open(TOPIC, 0, 7)  # never read
    tracker.consumed(TOPIC, 0, 7)
    assert tracker.is_open(TOPIC, 0, 7)  # read, not handed over
    tracker.handed_over(TOPIC, 0, 7, item)
    assert tracker.is_open(TOPIC, 0, 7)  # in flight
    tracker.ended(TOPIC, 0, 7)
    assert not tracker.is_open(TOPIC, 0, 7)
    tracker.consumed(TOPIC, 0, 8)
    tracker.forget(TOPIC, 0)
    assert not tracker.is_open(TOPIC, 0, 8)


# -- batches and queues --------------------------------------------------------------------


def _item(offset: int, lane: str | None) -> Consumed:
    return Consumed(TOPIC, 0, offset, "m", ops.set(f"k{offset}", 1), None, lane)


def test_critical_ops_are_batched_apart_from_ordinary_ones_of_their_target() -> None:
    batcher = Batcher(size=2, linger=60)
    assert batcher.add("default", _item(0, ORDINARY)) is None
    assert batcher.add("default", _item(1, CRITICAL)) is None
    full = batcher.add("default", _item(2, CRITICAL))
    assert full is not None
    assert [i.offset for i in full] == [1, 2]
    assert [[i.offset for i in b] for b in batcher.due(everything=True)] == [[0]]


class _App:
    """Records what a TaskSender publishes, as a Celery app would receive it."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def signature(self, name: str) -> str:
        return name

    def producer_or_acquire(self) -> Any:
        from contextlib import nullcontext

        return nullcontext(SimpleNamespace())

    def send_task(self, name: str, *, queue: str, **_: Any) -> None:
        self.sent.append((name, queue))


@pytest.mark.parametrize("one_task_per_op", [False, True])
def test_critical_batches_go_to_the_critical_queue(one_task_per_op: bool) -> None:
    app = _App()
    sender = TaskSender(app, "rr", one_task_per_op=one_task_per_op, critical_queue="rr.critical")
    sender.send([[_item(0, ORDINARY)], [_item(1, CRITICAL)]])
    assert [queue for _, queue in app.sent] == ["rr", "rr.critical"]


def _settings(**keys: Any) -> Settings:
    return Settings.from_mapping({"redis_retry_kafka": {"bootstrap.servers": "localhost:9092"},
                                  "redis_retry_targets": {"default": "redis://localhost:6379/0"}, **keys})


def test_the_critical_queue_defaults_beside_the_replay_queue_and_cannot_be_it() -> None:
    assert _settings().critical_queue == "redis-retry.critical"
    assert _settings(redis_retry_queue="rr").critical_queue == "rr.critical"
    assert _settings(redis_retry_critical_queue="urgent").critical_queue == "urgent"
    with pytest.raises(ConfigurationError, match="redis_retry_critical_queue must differ from redis_retry_queue"):
        _settings(redis_retry_queue="rr", redis_retry_critical_queue="rr")


def _installed_app(**conf: Any) -> Any:
    """A Celery app with ``install()`` done, on an in-memory broker."""
    from celery import Celery

    import celery_redis_retry

    app = Celery("lanes", broker="memory://", set_as_current=False)
    app.conf.update(redis_retry_kafka={"bootstrap.servers": "localhost:9092"},
                    redis_retry_targets={"default": "redis://localhost:6379/0"}, **conf)
    celery_redis_retry.install(app)
    return app


def test_an_op_sent_again_by_a_worker_goes_back_in_the_lane_its_task_came_in() -> None:
    from kombu import Queue

    app = _installed_app(task_queues=[Queue("redis-retry.critical", routing_key="urgent")])
    assert lane_queue(app, {"routing_key": "redis-retry.critical"}) == "redis-retry.critical"
    assert lane_queue(app, {"routing_key": "urgent"}) == "redis-retry.critical"  # the app's own binding
    assert lane_queue(app, {"routing_key": "redis-retry"}) == "redis-retry"
    assert lane_queue(app, None) == "redis-retry"


@pytest.mark.parametrize(("selected", "consumed"), [
    (["redis-retry"], {"redis-retry", "redis-retry.critical"}),
    (["billing", "redis-retry"], {"billing", "redis-retry", "redis-retry.critical"}),
    (["billing"], {"billing"}),  # a worker of other queues is left alone
])
def test_a_worker_of_the_replay_queue_consumes_the_critical_queue_too(selected: list[str], consumed: set[str]) -> None:
    from celery_redis_retry.replay.worker import _ConsumeCriticalQueue

    app = _installed_app()
    app.amqp.queues.select(selected)  # what -Q does
    _ConsumeCriticalQueue(SimpleNamespace(app=app))
    assert set(app.amqp.queues.consume_from) == consumed
