"""A Sentinel target through a real failover: the master is SIGKILLed while ops are being
replayed; the worker's retries land on the promoted replica, each op applied once.

Real processes: a master, a replica and a Sentinel (``redis-server --sentinel``), the
session's embedded Kafka, a ``celery worker`` and a bridge.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import redis
from loop_stack import LoopStack

from celery_redis_retry import ops
from celery_redis_retry.targets import connect
from celery_redis_retry.testing import RedisSentinel, wait_until

pytestmark = pytest.mark.slow


def _values(target: RedisSentinel, keys: list[str]) -> list[Any] | None:
    """The keys' values on the master of now; None while there is no master to ask."""
    try:
        with target.client(socket_timeout=1.0) as client:
            return list(client.mget(keys))
    except redis.RedisError:  # a failover in progress: ask again
        return None


def test_ops_replayed_during_a_failover_land_on_the_new_master(make_loop: Callable[..., LoopStack]) -> None:
    stack = make_loop(sentinel=True, max_retries=10)
    target = stack.target
    assert isinstance(target, RedisSentinel)
    stack.start_worker()
    bridge = stack.start_bridge()
    counters = [f"n:{i}" for i in range(300)]
    stack.publish_all([ops.incrby(key, 1) for key in counters])
    stack.wait_assigned(bridge)
    stack.wait_for(lambda: _values(target, counters) == [b"1"] * 300, 60, "the first ops applied on the master")
    old = target.master()
    replica = next(s for s in target.servers if s is not old)
    with replica.client() as client:
        wait_until(lambda: client.mget(counters) == [b"1"] * 300, 30, what="the replica to have the first ops")

    old.kill()  # the master dies; the ops below fail until the Sentinel promotes the replica
    sessions = [f"session:{i}" for i in range(100)]
    stack.publish_all([*(ops.incrby(key, 1) for key in counters), *(ops.set(key, "v") for key in sessions)])
    stack.wait_for(lambda: target.master_port() == replica.port, 60, "the Sentinel to promote the replica")
    stack.wait_for(lambda: _values(target, counters) == [b"2"] * 300, 120, "every counter at 2 on the new master")
    assert _values(target, sessions) == [b"v"] * 100
    print(f"\nmaster {old.port} killed, replica {replica.port} promoted")
    assert stack.outage_seen(), "the ops should have met the dead master first"
    assert stack.worker_log_count(r"retrying in") == 0, "an outage spends no attempt of the op"
    assert stack.dlq_is_empty()


def test_sentinel_urls_keep_their_query_options(tmp_path: Any) -> None:
    with RedisSentinel(dir=str(tmp_path)) as target:
        client = connect(target.url + "?socket_timeout=1.5&health_check_interval=7")
        try:
            assert client.ping()
            kwargs = client.connection_pool.connection_kwargs
            assert kwargs["socket_timeout"] == 1.5
            assert kwargs["health_check_interval"] == 7
        finally:
            client.close()


def test_an_asyncio_sentinel_client_captures_writes_while_its_master_is_dead(
    make_loop: Callable[..., LoopStack],
) -> None:
    import asyncio

    import redis.asyncio.sentinel
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    import celery_redis_retry

    stack = make_loop(sentinel=True, max_retries=10)
    target = stack.target
    assert isinstance(target, RedisSentinel)
    stack.start_worker()
    bridge = stack.start_bridge()
    old = target.master()
    sessions = [f"session:{i}" for i in range(10)]

    async def writes() -> list[Any]:
        sentinel = redis.asyncio.sentinel.Sentinel([("127.0.0.1", target.port)], socket_timeout=1)
        client = sentinel.master_for(target.service, socket_timeout=1, socket_connect_timeout=1,
                                     retry=Retry(NoBackoff(), 0))
        wrapped = celery_redis_retry.wrap(client, producer=stack.producer)  # its target names the same service
        assert await wrapped.set("warm", 1) is True
        old.kill()  # the Sentinel still names the dead master for a second: the writes below fail
        replies = [await wrapped.set(key, "v") for key in sessions]
        replies += [await wrapped.incrby("visits", 1) for _ in range(3)]
        await client.aclose()
        for sentinel_client in sentinel.sentinels:
            await sentinel_client.aclose()
        return replies

    assert asyncio.run(writes()) == [None] * 13
    stack.wait_for(lambda: target.master_port() not in (None, old.port), 60, "the Sentinel to promote the replica")
    stack.wait_assigned(bridge)
    stack.wait_for(lambda: _values(target, [*sessions, "visits"]) == [b"v"] * 10 + [b"3"], 90,
                   "the captured writes applied on the new master")
    assert stack.dlq_is_empty()
    assert _values(target, ["visits"]) == [b"3"]  # each INCRBY applied once
