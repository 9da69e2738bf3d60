"""Batched replay: the bridge's batches and offsets (pure), and the worker's pipelined run (real Redis)."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
import redis
from loop_stack import LoopStack, data_keys

from celery_redis_retry import ops
from celery_redis_retry.bridge import ends
from celery_redis_retry.bridge.dispatch import Batcher
from celery_redis_retry.bridge.offsets import Consumed, InFlight, OffsetTracker
from celery_redis_retry.config import Settings
from celery_redis_retry.errors import PermanentReplayError
from celery_redis_retry.replay.executor import Executor
from celery_redis_retry.replay.outcomes import ReplayResult
from celery_redis_retry.testing import RedisServer


def item(partition: int, offset: int, topic: str = "t") -> Consumed:
    return Consumed(topic, partition, offset, "{}", ops.set(f"k-{partition}-{offset}", "v"))


# -- offsets: never commit past an op not handed over -------------------------------------


def test_offsets_advance_only_over_a_contiguous_handed_over_prefix() -> None:
    tracker = OffsetTracker()
    for offset in range(10, 15):
        tracker.consumed("t", 0, offset)
    assert tracker.handed_over("t", 0, 12) is None  # 10 and 11 still open
    assert tracker.handed_over("t", 0, 11) is None
    assert tracker.first_open("t", 0) == 10
    assert tracker.handed_over("t", 0, 10) == 13  # 10, 11, 12 done: commit up to 13
    assert tracker.handed_over("t", 0, 14) is None
    assert tracker.handed_over("t", 0, 13) == 15
    assert tracker.first_open("t", 0) is None
    assert len(tracker) == 0


def test_partitions_are_tracked_apart_and_forgotten_on_revoke() -> None:
    tracker = OffsetTracker()
    tracker.consumed("t", 0, 5)
    tracker.consumed("t", 1, 7)
    tracker.consumed("t", 1, 8)
    assert tracker.handed_over("t", 1, 7) == 8
    tracker.forget("t", 0)
    assert tracker.handed_over("t", 0, 5) is None  # revoked meanwhile: nothing to store
    assert tracker.first_open("t", 1) == 8


def test_held_until_end_commits_only_past_ops_that_ended() -> None:
    tracker = OffsetTracker(hold_until_end=True, redelivery_timeout=30)
    for offset in range(5):
        assert tracker.consumed("t", 0, offset)
    for offset in range(4):
        assert tracker.handed_over("t", 0, offset, item(0, offset)) is None  # accepted by Celery: in flight
    assert tracker.in_flight == 4
    assert tracker.first_open("t", 0) == 4  # where a rewind reads again: 4 was never handed over
    assert tracker.ended("t", 0, 1) is None  # 0 has not ended
    assert tracker.ended("t", 0, 3) is None
    assert tracker.commit_point("t", 0) == (0, "1,3")  # offset 0, and what ended past it
    assert tracker.ended("t", 0, 0) == 2
    assert tracker.ended("t", 0, 0) is None  # reported twice: nothing moves
    assert tracker.in_flight == 1
    assert tracker.commit_point("t", 0) == (2, "3")
    # Read again after a rewind: ops in flight or ended are skipped, the rest handled again.
    assert not tracker.consumed("t", 0, 2)
    assert not tracker.consumed("t", 0, 3)
    assert tracker.consumed("t", 0, 4)
    assert tracker.ended("t", 0, 4) is None
    assert tracker.ended("t", 0, 2) == 5
    assert tracker.in_flight == 0
    assert len(tracker) == 0


def test_ops_in_flight_too_long_are_due_again_and_retries_push_the_time() -> None:
    tracker = OffsetTracker(hold_until_end=True, redelivery_timeout=10)
    for offset in (0, 1):
        tracker.consumed("t", 0, offset)
        tracker.handed_over("t", 0, offset, item(0, offset))
    now = time.monotonic()
    assert tracker.overdue(now + 5) == []
    tracker.retrying("t", 0, 1, due_in=60)  # a worker scheduled it again a minute ahead
    assert [i.offset for i in tracker.overdue(now + 11)] == [0]
    tracker.handed_over("t", 0, 0, item(0, 0))  # handed over again
    assert tracker.in_flight == 2
    assert [i.offset for i in tracker.overdue(now + 15)] == []  # the second hand-over waits twice as long
    assert [(i.offset, i.handovers) for i in tracker.overdue(now + 75)] == [(0, 2), (1, 1)]
    for _ in range(6):
        tracker.handed_over("t", 0, 0, item(0, 0))
    assert tracker.overdue(now + 79) == [InFlight("t", 0, 1, None, 1)]  # capped at 8 timeouts
    assert [i.offset for i in tracker.overdue(now + 81)] == [0, 1]


def test_ops_in_flight_leave_nothing_for_the_garbage_collector_to_walk() -> None:
    # A drain holds up to redis_retry_max_in_flight ops in flight: were each a tracked
    # object (or several), every full collection would walk them all.
    tracker = OffsetTracker(hold_until_end=True)
    gc.collect()
    before = len(gc.get_objects())
    for offset in range(10_000):
        tracker.consumed("t", 0, offset)
        tracker.handed_over("t", 0, offset, item(0, offset))
    gc.collect()
    assert tracker.in_flight == 10_000
    assert len(gc.get_objects()) - before < 100


def test_ops_scheduled_again_are_counted_until_they_end_or_are_handed_over_again() -> None:
    tracker = OffsetTracker(hold_until_end=True, redelivery_timeout=10)
    for offset in range(4):
        tracker.consumed("t", 0, offset)
        tracker.handed_over("t", 0, offset, item(0, offset))
    assert (tracker.retrying_ops, tracker.oldest_retrying()) == (0, None)
    now = time.monotonic()
    for offset in (0, 1, 2):
        tracker.retrying("t", 0, offset, due_in=30)
    tracker.retrying("t", 0, 0, due_in=60)  # its second retry: still one op
    assert tracker.retrying_ops == 3
    assert 4 < (tracker.oldest_retrying(now + 5) or 0) <= 5  # since its first retry
    tracker.ended("t", 0, 1)
    tracker.handed_over("t", 0, 2, item(0, 2))  # handed over again: not known to wait any more
    assert tracker.retrying_ops == 1
    tracker.forget("t", 0)
    assert (tracker.retrying_ops, tracker.in_flight) == (0, 0)


def test_the_sent_mark_tells_which_tasks_left_the_celery_queue() -> None:
    tracker = OffsetTracker(hold_until_end=True, redelivery_timeout=10)
    for offset, mark in ((0, 1), (1, 2), (2, 3)):
        tracker.consumed("t", 0, offset)
        tracker.handed_over("t", 0, offset, item(0, offset), sent_mark=mark)
    # 3 tasks sent, 1 still waits: the first two left the queue, the third may be the one waiting.
    taken = 3 - 1
    later = time.monotonic() + 11
    assert [i.offset for i in tracker.overdue(later, taken=taken)] == [0, 1]
    assert [i.offset for i in tracker.overdue(later)] == [0, 1, 2]


def test_a_restarted_partition_skips_what_ended_past_its_committed_offset() -> None:
    tracker = OffsetTracker(hold_until_end=True)
    tracker.assigned("t", 0, 10, frozenset({8, 11, 12}))  # 8 is below the commit: ignored
    assert tracker.commit_point("t", 0) == (10, "11-12")
    assert tracker.consumed("t", 0, 10)
    assert not tracker.consumed("t", 0, 11)
    assert not tracker.consumed("t", 0, 12)
    assert tracker.ended("t", 0, 10) == 13


def test_committing_at_hand_over_ends_an_op_when_celery_accepts_it() -> None:
    tracker = OffsetTracker(hold_until_end=False)
    tracker.consumed("t", 0, 0)
    assert tracker.handed_over("t", 0, 0, item(0, 0)) == 1
    assert tracker.in_flight == 0


def test_end_records_group_positions_per_partition_and_refuse_other_data() -> None:
    records = ends.encode_records([("t", 0, 5), ("t", 1, 7), ("t", 0, 6)], [(("t", 0, 9), 1234.5)])
    assert [(r.t, r.p, r.e, r.r) for r in records] == [("t", 0, [5, 6], [(9, 1234.5)]), ("t", 1, [7], [])]
    wire = msgspec.json.encode(records[0])
    assert ends.decode_record(wire) == records[0]
    assert ends.decode_record(b"not json") is None
    assert ends.decode_record(b'{"v": 2, "t": "t", "p": 0}') is None
    assert ends.position(["t", 3, 9]) == ("t", 3, 9)
    assert ends.position(["t", "3", 9]) is None


def test_end_records_carry_outcomes_once_and_old_records_read_without_them() -> None:
    records = ends.encode_records([("t", 0, 5), ("t", 1, 7)], (), {"applied": 1, "dead": 1, "superseded": 0})
    assert [r.o for r in records] == [{"applied": 1, "dead": 1}, None]  # one record counts the task's ops
    wires = [msgspec.json.encode(r) for r in records]
    assert b'"o"' not in wires[1]  # records without outcomes are written as before
    assert [ends.decode_record(w) for w in wires] == records
    old = ends.decode_record(b'{"v": 1, "t": "t", "p": 0, "e": [3]}')
    assert old is not None
    assert old.o is None


# -- batches: per target, full or lingering ------------------------------------------------


def test_batches_fill_per_target_and_linger_out() -> None:
    batcher = Batcher(size=3, linger=0.05)
    assert batcher.add("a", item(0, 1)) is None
    assert batcher.add("b", item(0, 2)) is None
    assert batcher.add("a", item(1, 1)) is None
    full = batcher.add("a", item(1, 2))
    assert [i.offset for i in full or []] == [1, 1, 2]
    assert batcher.due(now=0.0) == []  # "b" started later than t=0 - 0.05
    waiting = batcher.seconds_to_next()
    assert waiting is not None
    assert 0 <= waiting <= 0.05
    later = batcher.due(now=1e12)
    assert [[i.offset for i in b] for b in later] == [[2]]
    assert batcher.seconds_to_next() is None


def test_a_rewound_partition_leaves_its_waiting_ops_behind() -> None:
    batcher = Batcher(size=10, linger=60)
    batcher.add("a", item(0, 1))
    batcher.add("a", item(1, 1))
    batcher.add("b", item(0, 2))
    batcher.drop({("t", 0)})
    remaining = batcher.due(everything=True)
    assert [[(i.partition, i.offset) for i in b] for b in remaining] == [[(1, 1)]]


def test_batches_holding_revoked_partitions_are_taken_out_to_be_sent() -> None:
    batcher = Batcher(size=10, linger=60)
    batcher.add("a", item(0, 1))
    batcher.add("b", item(1, 1))
    taken = batcher.partitions_waiting({("t", 1)})
    assert [[(i.partition, i.offset) for i in b] for b in taken] == [[(1, 1)]]
    assert [[(i.partition, i.offset) for i in b] for b in batcher.due(everything=True)] == [[(0, 1)]]


# -- the worker side: many ops, one round trip ---------------------------------------------


@pytest.fixture
def executor(redis_server: RedisServer) -> Iterator[tuple[Executor, Any]]:
    settings = Settings.from_mapping(
        {
            "redis_retry_kafka": {"bootstrap.servers": "127.0.0.1:1"},
            "redis_retry_targets": {"default": redis_server.url},
            "redis_retry_scripts": {"bump": "return redis.call('INCRBY', KEYS[1], ARGV[1])"},
        }
    )
    with redis_server.client() as client:
        yield Executor(settings), client


@pytest.mark.slow
def test_run_many_gives_one_result_per_op_in_one_round_trip(executor: tuple[Executor, Any]) -> None:
    run, r = executor
    r.set("a-string", "x")
    r.set("guarded", "v2")
    batch = [
        ops.set("s", b"\xff"),  # plain
        ops.incrby("n", 2),  # exactly once
        ops.pipeline([ops.incrby("tx:a", 1), ops.rpush("tx:b", "x")]),  # transaction
        ops.script("bump", keys=["hits"], args=[5]),  # script not loaded yet: NOSCRIPT, then loaded
        ops.lpush("a-string", "v"),  # fails inside Lua: WRONGTYPE
        ops.sadd("a-string", "v"),  # fails as a plain command: WRONGTYPE
        ops.set("guarded", "v1", if_value="v0"),  # superseded
    ]
    results = run.run_many(batch)
    assert [r.outcome if isinstance(r, ReplayResult) else type(r).__name__ for r in results] == [
        "applied", "applied", "applied", "applied", "PermanentReplayError", "PermanentReplayError", "superseded",
    ]
    assert isinstance(results[4], PermanentReplayError)
    assert results[4].reason == "wrong_type"
    assert isinstance(results[5], PermanentReplayError)
    assert results[5].reason == "wrong_type"
    assert (r.get("s"), r.get("n"), r.get("tx:a"), r.lrange("tx:b", 0, -1), r.get("hits"), r.get("guarded")) == (
        b"\xff", b"2", b"1", [b"x"], b"5", b"v2",
    )
    again = run.run_many(batch[:4])
    outcomes = [r.outcome for r in again if isinstance(r, ReplayResult)]
    assert outcomes == ["applied", "duplicate", "duplicate", "duplicate"]
    assert (r.get("n"), r.get("hits")) == (b"2", b"5")


@pytest.mark.slow
def test_run_many_fails_only_the_op_that_cannot_be_prepared(executor: tuple[Executor, Any]) -> None:
    run, r = executor
    # A forged created_at far in the future: its write stamp (microseconds) is no integer.
    hostile = msgspec.structs.replace(ops.incrby("hostile", 1), created_at=1e308)
    results = run.run_many([ops.incrby("n", 1), hostile, ops.rpush("l", "x")])
    assert [type(x).__name__ for x in results] == ["ReplayResult", "OverflowError", "ReplayResult"]
    assert (r.get("n"), r.lrange("l", 0, -1), r.exists("hostile")) == (b"1", [b"x"], 0)


@pytest.mark.slow
# INCRBY takes the script's path for one plain command; HSET of a field, the general one.
@pytest.mark.parametrize("write", ["incrby", "hset-field"])
def test_a_lua_step_stopped_part_way_leaves_each_op_applied_once(executor: tuple[Executor, Any], write: str) -> None:
    run, r = executor
    # The middle op's write-stamp key is not a hash: reading it stops the whole Lua step
    # after the first op was applied. Every op then runs again on its own.
    r.set(b"crr:{broken}:w", "not a hash")
    broken = ops.incrby("broken", 1) if write == "incrby" else ops.hset("broken", "f", 1)
    results = run.run_many([ops.incrby("a", 1), broken, ops.rpush("b", "x")])
    assert [type(x).__name__ for x in results] == ["ReplayResult", "ResponseError", "ReplayResult"]
    assert "WRONGTYPE" in str(results[1])
    # The first op was applied by the step that stopped: its marker says so when it runs again.
    assert [x.outcome for x in results if isinstance(x, ReplayResult)] == ["duplicate", "applied"]
    assert (r.get("a"), r.exists("broken"), r.lrange("b", 0, -1)) == (b"1", 0, [b"x"])
    # The op that met the error took its marker and gave it back: once the key is fixed,
    # its next attempt applies it (a marker left behind would end it "duplicate", unapplied).
    r.delete(b"crr:{broken}:w")
    assert run.run(broken).outcome == "applied"
    assert (r.get("broken") if write == "incrby" else r.hget("broken", "f")) == b"1"


@pytest.mark.slow
def test_run_many_reports_a_retryable_reply_per_op(executor: tuple[Executor, Any], redis_server: RedisServer) -> None:
    run, r = executor
    r.config_set("min-replicas-to-write", 1)  # every write now gets NOREPLICAS: retryable
    try:
        results = run.run_many([ops.set("k", 1), ops.incrby("n", 1)])
    finally:
        r.config_set("min-replicas-to-write", 0)
    assert all(isinstance(x, redis.ResponseError) and "NOREPLICAS" in str(x) for x in results), results


@pytest.mark.slow
def test_run_many_raises_when_the_round_trip_fails(executor: tuple[Executor, Any], redis_server: RedisServer) -> None:
    run, _ = executor
    run.run_many([ops.set("warm", 1)])
    redis_server.kill()
    with pytest.raises(redis.ConnectionError):
        run.run_many([ops.set("k", 1), ops.incrby("n", 1)])


# -- backpressure: a backlog stays in Kafka, not in the Celery broker ----------------------


@pytest.mark.slow
def test_the_bridge_stops_reading_while_the_celery_queue_is_long(make_loop: Callable[..., LoopStack]) -> None:
    stack = make_loop(extra_env={"CRR_BATCH_SIZE": "10", "CRR_HIGH_WATER": "5"})
    assert stack.broker is not None
    bridge = stack.start_bridge()
    count = 3000
    stack.publish_all(ops.set(f"k:{i}", i) for i in range(count))
    stack.wait_assigned(bridge)
    bridge.wait_for_log(r"reading paused", timeout=60)
    queue = f"queue-{stack.name}"
    with stack.broker.client() as broker:
        lengths = []
        for _ in range(12):
            lengths.append(broker.llen(queue))
            time.sleep(0.25)
    # One loop reads at most 500 messages (50 tasks of 10) before it looks at the queue again.
    assert max(lengths) <= 5 + 50, lengths
    assert max(lengths) * 10 < count, "most of the backlog must still be in Kafka"
    stack.start_worker()
    with stack.client() as r:
        stack.wait_for(lambda: data_keys(r) == count, 120, "every op applied once the worker drains the queue")
    assert "reading again" in bridge.log_text()
