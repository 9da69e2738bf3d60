"""Write stamps: what each command stamps (pure), and what a replay does with them (a real redis-server).

The replays run through the worker's :class:`~celery_redis_retry.replay.executor.Executor`;
the newer writes through ``wrap()``, exactly as an application sends them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import redis

import celery_redis_retry
from celery_redis_retry import ops, stamps
from celery_redis_retry.config import Settings
from celery_redis_retry.ops import RedisOp
from celery_redis_retry.replay.executor import Executor
from celery_redis_retry.slots import slot_of
from celery_redis_retry.testing import RedisServer

# -- pure: units, kinds, keys ------------------------------------------------------------------


@pytest.mark.parametrize("key", ["plain", "user:{42}:name", "weird}key", "{}", "", b"\x00\xff", 12345])
def test_a_stamp_lives_in_its_keys_cluster_slot(key: Any) -> None:
    assert slot_of(stamps.stamp_key(key)) == slot_of(key)
    assert stamps.stamp_key(key).startswith(b"crr:{")


def test_distinct_keys_never_share_a_stamp() -> None:
    keys = ["a", "{a}", "a}", "{a}:w", "crr:{a}:w", "x{a}", "", "{}", "}{"]
    assert len({stamps.stamp_key(k) for k in keys}) == len(keys)


@pytest.mark.parametrize(
    ("command", "kind", "units"),
    [
        (("SET", "k", "v", "EX", 5), "=", [(1, b"", 0, 0)]),
        (("DEL", "a", "b"), "=", [(1, b"", 0, 0), (2, b"", 0, 0)]),
        (("MSET", "a", "1", "b", "2"), "=", [(1, b"", 0, 0), (3, b"", 0, 0)]),
        (("INCRBY", "n", 3), "+", [(1, b"", 0, 0)]),
        (("HSET", "h", "f", "v", "g", "w"), "=", [(1, b".f", 3, 2), (1, b".g", 5, 2)]),
        (("HDEL", "h", "f"), "=", [(1, b".f", 3, 1)]),
        (("HINCRBY", "h", "f", 1), "+", [(1, b".f", 0, 0)]),
        (("SADD", "s", "m", 7), "=", [(1, b".m", 3, 1), (1, b".7", 4, 1)]),
        (("ZADD", "z", "NX", "CH", 1, "m"), "=", [(1, b".m", 5, 2)]),
        (("ZADD", "z", "INCR", 1, "m"), "+", [(1, b".m", 0, 0)]),
        (("ZINCRBY", "z", 2, "m"), "+", [(1, b".m", 0, 0)]),
        (("PEXPIREAT", "k", 123), "=", [(1, stamps.TTL_UNIT, 0, 0)]),
        (("SUNIONSTORE", "dst", "a", "b"), "=", [(1, b"", 0, 0)]),
        (("COPY", "src", "dst"), "=", [(2, b"", 0, 0)]),
        (("LPUSH", "l", 1, 2), "+", [(1, b"", 0, 0)]),
    ],
)
def test_what_each_write_stamps(command: tuple[Any, ...], kind: str, units: list[stamps.Unit]) -> None:
    assert stamps.write_kind(command) == kind
    assert stamps.units(command) == units


def test_a_stamp_is_the_ops_issue_time_in_microseconds() -> None:
    op = ops.set("k", "v")
    assert stamps.stamp_of(op.created_at) == round(op.created_at * 1_000_000)
    assert abs(stamps.now_us() - time.time() * 1e6) < 1e6
    assert stamps.ttl_ms(86400, 604800) == (86400 + 3600) * 1000
    assert stamps.ttl_ms(0, 604800) == (604800 + 3600) * 1000


# -- real: replays against newer writes --------------------------------------------------------


class _Settings:
    """Stands in for a producer: a wrapped client only reads its settings while writes succeed."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings


@pytest.fixture
def stack(redis_server: RedisServer) -> Iterator[tuple[Executor, Any, redis.Redis]]:
    settings = Settings.from_mapping({"redis_retry_kafka": {"bootstrap.servers": "127.0.0.1:1"},
                                      "redis_retry_targets": {"default": redis_server.url}})
    client = redis_server.client()
    wrapped = celery_redis_retry.wrap(redis_server.client(), producer=_Settings(settings))  # type: ignore[arg-type]
    yield Executor(settings), wrapped, client
    client.close()


def _older(op: RedisOp, seconds: float = 1.0) -> RedisOp:
    """``op`` as if it had been issued ``seconds`` ago (captured during an outage)."""
    return msgspec.structs.replace(op, created_at=op.created_at - seconds)


@pytest.mark.slow
def test_a_replayed_overwrite_is_superseded_by_any_newer_write(stack: tuple[Executor, Any, redis.Redis]) -> None:
    executor, wrapped, r = stack
    wrapped.set("name", "new")
    assert executor.run(_older(ops.set("name", "old"))).outcome == "superseded"
    wrapped.incrby("count", 1)
    assert executor.run(_older(ops.set("count", 100))).outcome == "superseded"
    wrapped.set("gone", "back")
    assert executor.run(_older(ops.delete("gone"))).outcome == "superseded"
    assert r.mget("name", "count", "gone") == [b"new", b"1", b"back"]
    # Older than nothing stamped: applied, and a newer replay of the same key applies on top.
    assert executor.run(_older(ops.set("fresh", "v1"), 2)).outcome == "applied"
    assert executor.run(_older(ops.set("fresh", "v2"), 1)).outcome == "applied"
    assert executor.run(_older(ops.set("fresh", "v0"), 3)).outcome == "superseded"
    assert r.get("fresh") == b"v2"


@pytest.mark.slow
def test_increments_from_before_and_after_an_outage_all_count(stack: tuple[Executor, Any, redis.Redis]) -> None:
    executor, wrapped, r = stack
    wrapped.incrby("n", 2)
    assert executor.run(_older(ops.incrby("n", 5))).outcome == "applied"
    assert r.get("n") == b"7"
    wrapped.set("n", 0)  # a newer overwrite: the older increment must not land on it
    assert executor.run(_older(ops.incrby("n", 5))).outcome == "superseded"
    assert r.get("n") == b"0"


@pytest.mark.slow
def test_fields_are_stamped_one_by_one(stack: tuple[Executor, Any, redis.Redis]) -> None:
    executor, wrapped, r = stack
    wrapped.hset("h", "b", "new")
    outcome = executor.run(_older(ops.hset("h", {"a": "old-a", "b": "old-b"})))
    assert outcome.outcome == "applied"  # a applied, b superseded: the rest of the write still lands
    assert r.hgetall("h") == {b"a": b"old-a", b"b": b"new"}
    wrapped.hincrby("h", "hits", 1)
    assert executor.run(_older(ops.command("HINCRBY", "h", "hits", 4))).outcome == "applied"
    assert r.hget("h", "hits") == b"5"
    wrapped.delete("h")  # a whole-key overwrite supersedes every older field write
    assert executor.run(_older(ops.hset("h", {"c": "x"}))).outcome == "superseded"
    assert r.exists("h") == 0


@pytest.mark.slow
def test_a_transaction_applies_whole_or_not_at_all(stack: tuple[Executor, Any, redis.Redis]) -> None:
    executor, wrapped, r = stack
    wrapped.set("{t}b", "new")
    both = [ops.set("{t}a", "old"), ops.set("{t}b", "old")]
    assert executor.run(_older(ops.pipeline(both, transaction=True))).outcome == "superseded"
    assert r.mget("{t}a", "{t}b") == [None, b"new"]
    assert executor.run(_older(ops.pipeline(both, transaction=False))).outcome == "applied"  # per command
    assert r.mget("{t}a", "{t}b") == [b"old", b"new"]


@pytest.mark.slow
def test_stamps_expire_with_the_replay_window(stack: tuple[Executor, Any, redis.Redis]) -> None:
    _, wrapped, r = stack
    wrapped.set("k", "v", ex=60)
    ttl = r.pttl(stamps.stamp_key("k"))
    assert (24 * 3600 + 3600) * 1000 - 5000 < ttl <= (24 * 3600 + 3600) * 1000
    assert r.ttl("k") > 0  # the data key keeps its own TTL


@pytest.mark.slow
def test_without_stamps_a_replay_overwrites_as_before(redis_server: RedisServer) -> None:
    settings = Settings.from_mapping({"redis_retry_kafka": {"bootstrap.servers": "127.0.0.1:1"},
                                      "redis_retry_targets": {"default": redis_server.url},
                                      "redis_retry_write_stamps": False})
    wrapped = celery_redis_retry.wrap(redis_server.client(), producer=_Settings(settings))  # type: ignore[arg-type]
    with redis_server.client() as r:
        wrapped.set("k", "new")
        assert r.exists(stamps.stamp_key("k")) == 0
        assert Executor(settings).run(_older(ops.set("k", "old"))).outcome == "applied"
        assert r.get("k") == b"old"


@pytest.mark.slow
def test_a_direct_write_keeps_redis_replies_and_errors(stack: tuple[Executor, Any, redis.Redis]) -> None:
    _, wrapped, r = stack
    assert wrapped.set("s", "v") is True
    assert wrapped.set("s", "w", nx=True) is None
    assert wrapped.set("s", "w", get=True) == b"v"
    assert wrapped.hset("hh", mapping={"a": 1, "b": 2}) == 2
    assert wrapped.zadd("z", {"m": 1.5}) == 1
    assert wrapped.incrbyfloat("f", 0.5) == 0.5
    assert wrapped.delete("s", "missing") == 1
    with pytest.raises(redis.ResponseError, match=r"^WRONGTYPE"):
        wrapped.lpush("hh", "x")
    assert r.type("hh") == b"hash"
    r.script_flush()  # a restarted server has no scripts: the client loads it again
    assert wrapped.incr("after-flush") == 1


@pytest.mark.slow
def test_pipelined_writes_are_stamped_too(stack: tuple[Executor, Any, redis.Redis]) -> None:
    executor, wrapped, r = stack
    with wrapped.pipeline(transaction=False) as pipe:
        assert pipe.set("p", "new").get("p").incr("pn").hset("ph", "f", "v").execute() == [True, b"new", 1, 1]
    with wrapped.pipeline() as pipe:  # MULTI/EXEC
        assert pipe.set("{q}a", "new").incrby("{q}n", 2).get("{q}a").execute() == [True, 2, b"new"]
    for key in ("p", "pn", "ph", "{q}a", "{q}n"):
        assert r.exists(stamps.stamp_key(key)) == 1, key
    assert executor.run(_older(ops.set("p", "old"))).outcome == "superseded"
    assert executor.run(_older(ops.set("{q}a", "old"))).outcome == "superseded"
    assert r.mget("p", "{q}a") == [b"new", b"new"]
    # A server that lost its scripts (restarted): the writes run again, a read still after its write.
    r.script_flush()
    with wrapped.pipeline(transaction=False) as pipe:
        assert pipe.set("p", "newer").get("p").execute() == [True, b"newer"]
    r.script_flush()
    with wrapped.pipeline() as pipe:
        assert pipe.set("p", "newest").get("p").execute() == [True, b"newest"]
    with pytest.raises(redis.ResponseError, match=r"Command # 2 .*WRONGTYPE"), wrapped.pipeline() as pipe:
        pipe.set("p", "x").lpush("p", "y").execute()
