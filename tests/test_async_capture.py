"""wrap() and the on_failure guard with redis.asyncio clients, against a real redis-server and Kafka.

The unit-ish tests drive a wrapped ``redis.asyncio.Redis`` with ``asyncio.run``; the ops it
captures are collected through ``on_capture`` (what the producer was given) and the producer
publishes them to the session's embedded broker. The end-to-end test runs the FastAPI example
as a uvicorn subprocess with a real Celery worker and bridge loop.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

import celery_redis_retry
from celery_redis_retry import ops
from celery_redis_retry.capture.producer import RetryProducer
from celery_redis_retry.config import Settings
from celery_redis_retry.errors import CapturedWriteError
from celery_redis_retry.ops import RedisOp
from celery_redis_retry.testing import (
    CeleryCommand,
    CeleryWorker,
    EmbeddedKafka,
    ManagedProcess,
    RedisServer,
    free_port,
    read_topic,
    wait_until,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def producer(
    kafka: EmbeddedKafka, unique_topic: str, tmp_path: Path, redis_server: RedisServer
) -> Iterator[RetryProducer]:
    settings = Settings.from_mapping({
        "redis_retry_kafka": kafka.config,
        "redis_retry_targets": {"default": redis_server.url},
        "redis_retry_topic": unique_topic,
        "redis_retry_spool_path": str(tmp_path / "spool.sqlite3"),
    })
    p = RetryProducer(settings, handle_sigterm=False)
    yield p
    p.close(5)


def async_client(server: RedisServer) -> redis.asyncio.Redis:
    # No redis-py retries and short timeouts: a dead server shows at once.
    return redis.asyncio.Redis(port=server.port, socket_timeout=1, socket_connect_timeout=1,
                               retry=Retry(NoBackoff(), 0))


def test_an_asyncio_client_returns_the_plain_replies(redis_server: RedisServer, producer: RetryProducer) -> None:
    async def run() -> None:
        plain = async_client(redis_server)
        r = celery_redis_retry.wrap(plain, producer=producer)
        assert isinstance(r, redis.asyncio.Redis)
        assert r.uncaptured is plain
        assert await r.set("k", "v") is True
        assert await r.incrby("n", 5) == 5
        assert await r.incrby("n", 2) == 7  # not idempotent: sent with an op id and a marker
        assert await r.hset("h", mapping={"a": 1, "b": 2}) == 2
        assert await r.get("k") == b"v"
        for transaction, replies in ((True, [True, 1, b"1", 1]), (False, [True, 2, b"1", 0])):
            async with r.pipeline(transaction=transaction) as pipe:
                pipe.set("p", 1).incr("pn").get("p").hset("ph", "f", "x")
                assert await pipe.execute() == replies
        async with r.lock("lk", timeout=5):  # locks run on the plain client
            pass
        await plain.aclose()

    asyncio.run(run())
    with redis_server.client() as check:
        assert check.get("n") == b"7"
        assert check.hgetall("h") == {b"a": b"1", b"b": b"2"}


def test_an_asyncio_client_captures_a_failed_write(redis_server: RedisServer, producer: RetryProducer) -> None:
    captured: list[RedisOp] = []

    async def run() -> None:
        plain = async_client(redis_server)
        r = celery_redis_retry.wrap(plain, producer=producer, on_capture=captured.append)
        raising = celery_redis_retry.wrap(plain, producer=producer, raise_on_capture=True, on_capture=captured.append)
        assert await r.set("warm", 1) is True
        watched = r.pipeline()
        await watched.watch("order:7")
        watched.multi()
        watched.set("order:7", 1)
        redis_server.stop()
        assert await r.set("user:1", b"profile", ex=300) is None
        assert await r.incrby("visits", 5) is None
        async with r.pipeline() as pipe:
            pipe.hset("order:7", mapping={"total": 12}).get("order:7").sadd("orders", 7)
            assert await pipe.execute() is None
        with pytest.raises(CapturedWriteError) as raised:
            await raising.delete("gone")
        assert raised.value.op is captured[-1]
        with pytest.raises(redis.ConnectionError):
            await r.get("user:1")  # reads are never captured
        with pytest.raises(redis.ConnectionError):
            await r.lpop("queue")  # nor writes whose reply is the point
        with pytest.raises((redis.ConnectionError, redis.WatchError)):
            await watched.execute()  # an optimistic check cannot be replayed
        await watched.reset()
        await plain.aclose()

    asyncio.run(run())
    assert producer.flush(10) == 0
    set_op, incr, pipe_op, delete = captured
    assert set_op.commands[0][:4] == ("SET", "user:1", b"profile", "PXAT")
    assert incr.commands == (("INCRBY", "visits", 5),)
    assert pipe_op.kind == "pipeline"
    assert pipe_op.transaction is True
    assert pipe_op.commands == (("HSET", "order:7", "total", 12), ("SADD", "orders", 7))
    assert delete.commands == (("DEL", "gone"),)
    for op in captured:
        assert op.error is not None
        assert op.error.type == "redis.exceptions.ConnectionError"
        assert op.source == f"{__name__}.run"
    assert producer.stats.published == 4


def test_the_async_guard_publishes_a_failed_block(redis_server: RedisServer, producer: RetryProducer) -> None:
    async def run() -> tuple[str | None, str | None]:
        r = async_client(redis_server)
        redis_server.stop()
        async with celery_redis_retry.on_failure(ops.delete("k"), source="Repo.delete", producer=producer) as guard:
            await r.delete("k")
        async with celery_redis_retry.on_failure(ops.delete("k"), producer=producer) as untouched:
            pass
        with pytest.raises(ValueError, match="not a Redis error"):
            async with celery_redis_retry.on_failure(ops.delete("k"), producer=producer):
                raise ValueError("not a Redis error")
        await r.aclose()
        return guard.op_id, untouched.op_id

    published, untouched = asyncio.run(run())
    assert published is not None
    assert untouched is None
    assert producer.flush(10) == 0
    assert producer.stats.published == 1


def test_a_durable_publish_runs_in_a_thread_off_the_loop(
    kafka: EmbeddedKafka, unique_topic: str, tmp_path: Path, redis_server: RedisServer
) -> None:
    settings = Settings.from_mapping({
        "redis_retry_kafka": kafka.config, "redis_retry_targets": {"default": redis_server.url},
        "redis_retry_topic": unique_topic, "redis_retry_spool_path": str(tmp_path / "spool.sqlite3"),
        "redis_retry_durable_publish": True,
    })
    durable = RetryProducer(settings, handle_sigterm=False)
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.perf_counter())
            await asyncio.sleep(0.001)

    async def run() -> str:
        beat = asyncio.get_running_loop().create_task(ticker())
        await asyncio.sleep(0.01)
        op_id = await durable.publish_async(ops.set("k", "v"))
        beat.cancel()
        return op_id

    try:
        assert asyncio.run(run())
    finally:
        durable.close(5)
    # The publish waited for Kafka's acknowledgement in a thread while the loop kept ticking.
    assert len(ticks) > 3
    assert max(b - a for a, b in itertools.pairwise(ticks)) < 0.05


# -- the FastAPI example end to end -------------------------------------------------------------

EXAMPLES = Path(__file__).parent.parent / "examples"


def http(base: str, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    """One JSON request to the served example: its status and decoded body."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method,  # noqa: S310 - a local test URL
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture
def served(
    kafka: EmbeddedKafka, redis_factory: Callable[..., RedisServer], tmp_path: Path
) -> Iterator[dict[str, Any]]:
    """examples/fastapi_service served by uvicorn, with its worker and bridge, on a target that keeps its data."""
    target = redis_factory(free_port(), args=("--appendonly", "yes", "--appendfsync", "always"))
    name = uuid.uuid4().hex[:8]
    env = {
        "SESSIONS_REDIS_URL": target.url, "CELERY_BROKER_URL": redis_factory().url,
        "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers, "REDIS_RETRY_TOPIC": f"sessions-{name}",
        "REDIS_RETRY_CONSUMER_GROUP": f"sessions-{name}", "REDIS_RETRY_SPOOL_PATH": str(tmp_path / "spool.sqlite3"),
    }
    app, port = "fastapi_service.celery_app", free_port()
    web = ManagedProcess([sys.executable, "-m", "uvicorn", "fastapi_service.web:app", "--port", str(port)],
                         env=env, cwd=str(EXAMPLES), log_dir=tmp_path)
    replay = [CeleryWorker(app, queues=["redis-retry"], env=env, cwd=str(EXAMPLES), log_dir=tmp_path),
              CeleryCommand(app, ["redis-retry", "bridge"], env=env, cwd=str(EXAMPLES), log_dir=tmp_path)]
    with web, replay[1].start(ready_pattern=r"bridge consuming", timeout=90), replay[0].start(timeout=120):
        web.wait_for_log(r"Application startup complete", timeout=60)
        yield {"base": f"http://127.0.0.1:{port}", "target": target, "env": env, "logs": [web, *replay]}


def test_the_fastapi_example_keeps_its_writes_through_an_outage_without_stalling_its_loop(
    served: dict[str, Any], kafka: EmbeddedKafka
) -> None:
    base, target = served["base"], served["target"]
    assert http(base, "PUT", "/sessions/before", {"user": "ada"}) == (200, {"session": "before", "status": "done"})
    assert http(base, "POST", "/counters/hits/incr")[0] == 200

    target.stop()
    http(base, "POST", "/stall/reset")
    for number in range(20):
        assert http(base, "PUT", f"/sessions/s{number}", {"user": "grace", "n": number})[0] == 202
    for _ in range(3):
        assert http(base, "POST", "/counters/hits/incr") == (202, {"counter": "hits", "status": "accepted"})
    assert http(base, "GET", "/counters/hits")[0] == 503  # reads are never captured
    stall_ms = http(base, "GET", "/stall")[1]["longest_ms"]
    print(f"longest event loop stall while 23 writes were captured: {stall_ms:.3f} ms")
    assert stall_ms < 5.0

    target.start()

    def applied() -> bool:
        return (http(base, "GET", "/counters/hits")[1].get("value") == 4
                and http(base, "GET", "/sessions/s19")[0] == 200)

    try:
        wait_until(applied, 90, interval=0.25, what="the captured writes applied")
    except TimeoutError as exc:
        logs = "\n".join(f"--- {p.log_path}\n{p.log_tail(30)}" for p in served["logs"])
        raise AssertionError(f"{exc}\n{logs}") from exc
    time.sleep(2)  # a second application of an INCRBY would show by now
    assert http(base, "GET", "/counters/hits")[1]["value"] == 4
    with target.client() as r:
        assert r.smembers("user:grace:sessions") == {f"s{n}".encode() for n in range(20)}
        assert json.loads(r.get("session:s7") or b"{}") == {"user": "grace", "n": 7}
        assert 0 < r.ttl("session:s7") <= 1800
    assert read_topic(kafka.bootstrap_servers, f"{served['env']['REDIS_RETRY_TOPIC']}.dlq", idle=2) == []


def test_asyncio_writes_are_stamped_reload_their_script_and_drop_their_markers(
    redis_server: RedisServer, producer: RetryProducer
) -> None:
    from celery_redis_retry import stamps

    with redis_server.client() as check:
        async def run() -> None:
            plain = async_client(redis_server)
            r = celery_redis_retry.wrap(plain, producer=producer)
            assert await r.set("s", "v") is True
            assert check.exists(stamps.stamp_key("s")) == 1  # sent through write_stamped.lua
            with pytest.raises(redis.ResponseError, match=r"^WRONGTYPE"):
                await r.lpush("s", "x")  # not retryable: raised as it is
            check.script_flush()  # a restarted server has no scripts: the client loads it again
            assert await r.incr("after-flush") == 1
            for transaction in (False, True):
                check.script_flush()
                async with r.pipeline(transaction=transaction) as pipe:
                    assert await pipe.set("p", int(transaction)).get("p").execute() == [True, b"%d" % transaction]
            # Confirmed INCRs leave no marker behind: unlinked in batches by a task of the loop.
            for _ in range(300):
                await r.incr("hot")
            await asyncio.sleep(0.2)
            await plain.aclose()

        asyncio.run(run())
        assert check.get("hot") == b"300"
        # At most the last batch, not yet due, is left (to the markers' TTL): not one per INCR.
        assert len(list(check.scan_iter(match="crr:*applied*", count=1000))) < 100


def test_publishing_from_the_loop_costs_microseconds(producer: RetryProducer) -> None:
    async def run() -> list[float]:
        await producer.publish_async(ops.set("first", 1))  # starts the producer, in a thread
        took = []
        for i in range(200):
            began = time.perf_counter()
            await producer.publish_async(ops.set(f"k:{i}", i))
            took.append(time.perf_counter() - began)
        return sorted(took)

    took = asyncio.run(run())
    median, worst = took[len(took) // 2], took[-1]
    print(f"publish_async inline: median {median * 1e6:.0f} µs, slowest {worst * 1e6:.0f} µs")
    assert median < 0.0002
    assert producer.flush(10) == 0
