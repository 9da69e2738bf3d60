"""wrap() on Redis Cluster clients, synchronous and asyncio, through an outage of the whole cluster.

Real processes: a 3-master cluster (``make_loop(cluster=True)``), the session's embedded
Kafka, a ``celery worker`` and a bridge. Every master is stopped, writes to keys of every
master's slots are captured, and once the cluster is back each key holds its value on the
node that owns its slot, each INCRBY applied once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio.cluster
import redis.cluster
from loop_stack import LoopStack
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

import celery_redis_retry
from celery_redis_retry.ops import RedisOp
from celery_redis_retry.slots import slot_of
from celery_redis_retry.testing import RedisCluster

pytestmark = pytest.mark.slow

KEYS = 24  # spread over the three masters' slots (checked below)
FAST = {"socket_timeout": 1, "socket_connect_timeout": 1}


def _owner_values(cluster: RedisCluster, keys: list[str]) -> list[bytes | None]:
    """Each key's value read from the node that owns its slot now (a plain client: no redirection)."""
    values = []
    for key in keys:
        with cluster.master_of(slot_of(key)).client() as node:
            values.append(node.get(key))
    return values


def _cluster_ok(cluster: RedisCluster) -> bool:
    return all(b"cluster_state:ok" in node.quick_client().execute_command("CLUSTER", "INFO") for node in cluster.nodes)


def test_writes_to_every_master_are_captured_and_replayed_on_the_slot_owner(
    make_loop: Callable[..., LoopStack],
) -> None:
    stack = make_loop(cluster=True, max_retries=10)
    cluster = stack.target
    assert isinstance(cluster, RedisCluster)
    stack.start_worker()
    bridge = stack.start_bridge()
    port = cluster.nodes[0].port
    captured: list[RedisOp] = []
    plain = redis.cluster.RedisCluster(host="127.0.0.1", port=port, retry=Retry(NoBackoff(), 0), **FAST)
    sync = celery_redis_retry.wrap(plain, producer=stack.producer, on_capture=captured.append)
    sync_keys, async_keys = [f"s:{i}" for i in range(KEYS)], [f"a:{i}" for i in range(KEYS)]
    doomed = [f"d:{i}" for i in range(2 * KEYS)]  # deleted while the cluster is down
    masters = {cluster.master_of(slot_of(key)).port for key in sync_keys + async_keys}
    assert len(masters) == 3  # the keys fall on every master

    async def asyncio_writes() -> list[Any]:
        client = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=port, retry=AsyncRetry(NoBackoff(), 0),
                                                    **FAST)
        wrapped = celery_redis_retry.wrap(client, producer=stack.producer, on_capture=captured.append)
        assert isinstance(wrapped, redis.asyncio.cluster.RedisCluster)
        assert await wrapped.set("a:warm", 1) is True  # learns the slots while the cluster is up
        await wrapped.mset_nonatomic(dict.fromkeys(doomed, 1))
        assert await wrapped.delete("a:warm", "a:0", "a:1", "a:2") == 1  # a multi-slot DEL while up
        async with wrapped.pipeline() as pipe:
            assert await pipe.set("{p}:warm", 1).get("{p}:warm").execute() == [True, b"1"]
        for node in cluster.nodes:
            node.stop()
        replies = [await wrapped.set(key, key) for key in async_keys]
        replies.append(await wrapped.delete(*doomed[:KEYS]))  # keys of every master: one DEL per slot
        async with wrapped.pipeline() as pipe:
            assert await pipe.set("{p}:1", "one").incrby("{p}:n", 1).execute() is None
        replies += [await wrapped.incrby(f"{key}:n", 1) for key in async_keys]
        with pytest.raises(redis.RedisError):
            await wrapped.get("a:0")  # reads are never captured
        await client.aclose()
        return replies

    try:
        assert sync.set("s:warm", 1) is True
        assert sync.delete("s:warm", "s:0", "s:1", "s:2") == 1  # a multi-slot DEL while the cluster is up
        async_replies = asyncio.run(asyncio_writes())
        sync_replies = [sync.set(key, key) for key in sync_keys] + [sync.incrby(f"{key}:n", 1) for key in sync_keys]
        sync_replies.append(sync.unlink(*doomed[KEYS:]))
    finally:
        plain.close()
    assert async_replies + sync_replies == [None] * (4 * KEYS + 2)
    assert len(captured) == 4 * KEYS + 3
    pipelines = [op.commands for op in captured if op.kind == "pipeline"]
    assert pipelines[1] == (("SET", "{p}:1", "one"), ("INCRBY", "{p}:n", 1))
    for split, command in ((pipelines[0], "DEL"), (pipelines[2], "UNLINK")):  # one command per slot
        assert {name for name, *_ in split} == {command}
        assert all(len({slot_of(key) for key in keys}) == 1 for _, *keys in split)

    for node in cluster.nodes:
        node.start()
    stack.wait_for(lambda: _cluster_ok(cluster), 30, "the cluster to report cluster_state:ok")
    stack.wait_assigned(bridge)
    keys = sync_keys + async_keys
    stack.wait_for(lambda: _owner_values(cluster, keys) == [k.encode() for k in keys], 90,
                   "every key's value on the node that owns its slot")
    counters = [f"{key}:n" for key in keys]
    stack.wait_for(lambda: _owner_values(cluster, counters) == [b"1"] * len(counters), 60, "every counter at 1")
    time.sleep(2)  # a second application of an INCRBY would show by now
    assert _owner_values(cluster, counters) == [b"1"] * len(counters)
    assert _owner_values(cluster, ["{p}:1", "{p}:n"]) == [b"one", b"1"]  # the asyncio cluster pipeline's op
    assert _owner_values(cluster, doomed) == [None] * len(doomed)  # the multi-slot DEL and UNLINK
    assert stack.dlq_is_empty()
