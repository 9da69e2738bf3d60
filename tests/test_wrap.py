"""wrap(): a redis-py client whose failed writes are published, against a real redis-server and Kafka.

The server is stopped (or killed) for real, the producer publishes to the session's
embedded broker, and every assertion on what was published reads the topic back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

import celery_redis_retry
from celery_redis_retry import message, ops
from celery_redis_retry.capture.producer import RetryProducer
from celery_redis_retry.capture.wrap import WRITE_OUTAGES, CapturedWriteError
from celery_redis_retry.config import Settings
from celery_redis_retry.ops import RedisOp
from celery_redis_retry.testing import EmbeddedKafka, RedisServer, read_topic

pytestmark = pytest.mark.slow

BUMP = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


class Published:
    """A producer on a topic of its own, and what it published, read back from Kafka."""

    def __init__(self, kafka: EmbeddedKafka, topic: str, spool: Path, server_url: str) -> None:
        self.kafka = kafka
        self.topic = topic
        settings = Settings.from_mapping({
            "redis_retry_kafka": kafka.config,
            # wrap() refuses a client of another server than its target's.
            "redis_retry_targets": {"default": server_url, "sessions": server_url},
            "redis_retry_topic": topic,
            "redis_retry_spool_path": str(spool),
            "redis_retry_scripts": {"bump": BUMP},
        })
        self.producer = RetryProducer(settings, handle_sigterm=False)

    def ops(self) -> list[RedisOp]:
        """Every op in the topic (waits for deliveries first, then reads until idle)."""
        assert self.producer.flush(10) == 0
        return [message.decode(r.value or b"") for r in read_topic(self.kafka.bootstrap_servers, self.topic, idle=1.5)]


@pytest.fixture
def published(
    kafka: EmbeddedKafka, unique_topic: str, tmp_path: Path, redis_server: RedisServer
) -> Iterator[Published]:
    p = Published(kafka, unique_topic, tmp_path / "spool.sqlite3", redis_server.url)
    yield p
    p.producer.close(5)


def fast_client(server: RedisServer, **kwargs: Any) -> redis.Redis:
    # No redis-py retries and short timeouts: a dead server shows at once.
    return server.client(socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0), **kwargs)


def test_a_client_wrapped_with_a_priority_marks_every_op_it_captures(
    redis_server: RedisServer, published: Published
) -> None:
    plain = fast_client(redis_server)
    critical = celery_redis_retry.wrap(plain, producer=published.producer, priority="critical")
    ordinary = celery_redis_retry.wrap(plain, producer=published.producer)
    with pytest.raises(ValueError, match="priority must be 'critical' or None, got 'urgent'"):
        celery_redis_retry.wrap(plain, producer=published.producer, priority="urgent")  # type: ignore[arg-type]
    redis_server.stop()
    assert critical.set("payment:1", "captured") is None
    assert ordinary.set("cart:1", "x") is None
    pipe = critical.pipeline()
    pipe.incrby("payment:count", 1)
    assert pipe.execute() is None
    assert sorted((op.first_key, op.priority) for op in published.ops()) == [
        ("cart:1", None), ("payment:1", "critical"), ("payment:count", "critical")]


def test_failed_writes_are_published_as_ops(redis_server: RedisServer, published: Published) -> None:
    plain = fast_client(redis_server)
    r = celery_redis_retry.wrap(plain, producer=published.producer)
    assert isinstance(r, redis.Redis)
    assert r.set("up", "1") is True  # a working server: nothing to capture
    redis_server.stop()

    before_ms = int(time.time() * 1000)
    assert r.set("user:1", b"\x00profile", ex=300) is None
    assert r.delete("session:1", "session:2") is None
    assert r.incrby("visits", 5) is None
    assert r.hset("user:1:h", mapping={"name": "Ada", "age": 36}) is None
    assert r.execute_command("SADD", "tags", "a", "b") is None

    found = published.ops()
    assert sorted(str(op.commands[0][0]) for op in found) == ["DEL", "HSET", "INCRBY", "SADD", "SET"]
    by_name = {op.commands[0][0]: op for op in found}
    set_op = by_name["SET"]
    assert set_op.commands[0][:4] == ("SET", "user:1", b"\x00profile", "PXAT")  # EX made absolute
    assert before_ms + 300_000 <= int(set_op.commands[0][4]) <= int(time.time() * 1000) + 300_000
    assert by_name["DEL"].commands == (("DEL", "session:1", "session:2"),)
    assert by_name["INCRBY"].commands == (("INCRBY", "visits", 5),)
    assert by_name["HSET"].commands == (("HSET", "user:1:h", "name", "Ada", "age", 36),)
    assert by_name["SADD"].commands == (("SADD", "tags", "a", "b"),)
    for op in found:
        assert op.kind == "command"
        assert op.target == "default"
        assert op.error is not None
        assert op.error.type == "redis.exceptions.ConnectionError"
        assert op.error.outcome_unknown is False  # refused: the command never ran
        assert op.source == f"{__name__}.test_failed_writes_are_published_as_ops"
    assert plain.connection_pool is r.connection_pool


def test_reads_fail_as_usual_and_are_not_published(redis_server: RedisServer, published: Published) -> None:
    r = celery_redis_retry.wrap(fast_client(redis_server), producer=published.producer)
    redis_server.stop()
    with pytest.raises(redis.ConnectionError):
        r.get("user:1")
    with pytest.raises(redis.ConnectionError):
        r.hgetall("user:1:h")
    with pytest.raises(redis.ConnectionError):
        r.lpop("queue")  # a write whose reply is the point: a replay would lose the element
    r.set("after", 1)  # captured: shows the topic is read to its end
    assert [op.commands for op in published.ops()] == [(("SET", "after", 1),)]


def test_a_pipeline_is_one_op_of_its_writes(redis_server: RedisServer, published: Published) -> None:
    r = celery_redis_retry.wrap(fast_client(redis_server), producer=published.producer)
    redis_server.stop()
    with r.pipeline() as pipe:
        pipe.hset("order:7", mapping={"total": 12})
        pipe.get("order:7")  # reads are dropped from the op
        pipe.sadd("orders:user:3", 7).incrby("orders:count", 1)
        assert pipe.execute() is None
    pipe = r.pipeline(transaction=False)
    pipe.set("a", 1).set("b", 2)
    assert pipe.execute() is None

    found = sorted(published.ops(), key=lambda op: len(op.commands), reverse=True)
    assert [op.kind for op in found] == ["pipeline", "pipeline"]
    assert found[0].transaction is True
    assert found[0].commands == (
        ("HSET", "order:7", "total", 12), ("SADD", "orders:user:3", 7), ("INCRBY", "orders:count", 1)
    )
    assert found[1].transaction is False
    assert found[1].commands == (("SET", "a", 1), ("SET", "b", 2))


def test_watched_pipelines_and_locks_are_never_captured(redis_server: RedisServer, published: Published) -> None:
    r = celery_redis_retry.wrap(fast_client(redis_server), producer=published.producer)
    with r.pipeline() as pipe:
        pipe.watch("balance")
        balance = int(pipe.get("balance") or 0)
        pipe.multi()
        pipe.set("balance", balance + 1)
        redis_server.kill()
        with pytest.raises(redis.WatchError):  # redis-py's own answer; the check cannot be replayed later
            pipe.execute()
    with pytest.raises(redis.ConnectionError):
        r.lock("resource", blocking_timeout=0.1).acquire()
    r.set("after", 1)
    assert [op.commands for op in published.ops()] == [(("SET", "after", 1),)]


def test_opting_out_does_not_publish(redis_server: RedisServer, published: Published) -> None:
    plain = fast_client(redis_server)
    r = celery_redis_retry.wrap(plain, producer=published.producer)
    assert r.uncaptured is plain
    redis_server.stop()
    with pytest.raises(redis.ConnectionError):
        r.uncaptured.set("must-not-replay", 1)
    with pytest.raises(redis.ConnectionError):
        plain.incrby("must-not-replay", 1)  # the client that was wrapped is unchanged
    r.set("after", 1)
    assert [op.commands for op in published.ops()] == [(("SET", "after", 1),)]


def test_non_retryable_errors_pass_through_untouched(redis_server: RedisServer, published: Published) -> None:
    r = celery_redis_retry.wrap(fast_client(redis_server), producer=published.producer)
    r.set("a-string", "x")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        r.lpush("a-string", "y")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        r.pipeline().hset("a-string", "f", "v").execute()
    with pytest.raises(redis.ResponseError, match="wrong number of arguments"):
        r.execute_command("SET", "only-a-key")
    redis_server.stop()
    r.set("after", 1)
    assert [op.commands for op in published.ops()] == [(("SET", "after", 1),)]


def test_raise_on_capture_and_on_capture(redis_server: RedisServer, published: Published) -> None:
    seen: list[RedisOp] = []
    r = celery_redis_retry.wrap(
        fast_client(redis_server), producer=published.producer, source="Sessions.end", target="sessions",
        raise_on_capture=True, on_capture=seen.append,
    )
    redis_server.kill()
    with pytest.raises(CapturedWriteError) as captured:
        r.delete("session:9")
    assert isinstance(captured.value, celery_redis_retry.RedisRetryError)
    assert isinstance(captured.value.__cause__, redis.ConnectionError)
    assert captured.value.op_id == seen[0].id
    assert f"captured for replay as op {seen[0].id}" in str(captured.value)
    [op] = published.ops()
    assert op == seen[0]
    assert op.source == "Sessions.end"
    assert op.target == "sessions"


def test_registered_scripts_are_captured_by_name(redis_server: RedisServer, published: Published) -> None:
    r = celery_redis_retry.wrap(fast_client(redis_server), producer=published.producer)
    bump = r.register_script(BUMP)
    assert bump(keys=["score"], args=[2]) == 2
    unknown = r.register_script("return redis.call('DEL', KEYS[1])")
    redis_server.stop()
    assert bump(keys=["score"], args=[3]) is None
    with pytest.raises(redis.ConnectionError):
        unknown(keys=["x"])  # not in redis_retry_scripts: the workers could not run it
    [op] = published.ops()
    assert (op.kind, op.script, op.keys, op.args) == ("script", "bump", ("score",), (3,))


def test_decode_responses_clients_keep_working(redis_server: RedisServer, published: Published) -> None:
    r = celery_redis_retry.wrap(fast_client(redis_server, decode_responses=True), producer=published.producer)
    r.hset("h", mapping={"a": "é"})
    assert r.hgetall("h") == {"a": "é"}
    assert r.execute_command("GET", "missing") is None
    assert r.pipeline().set("k", "v").get("k").execute() == [True, "v"]
    redis_server.stop()
    assert r.set("k", "w") is None
    assert [op.commands for op in published.ops()] == [(("SET", "k", "w"),)]


def test_captured_ops_are_replayable_as_published(redis_server: RedisServer, published: Published) -> None:
    """What wrap() publishes is what ops builders build: the same op model, same validation."""
    r = celery_redis_retry.wrap(fast_client(redis_server), producer=published.producer)
    redis_server.stop()
    r.zadd("board", {"ada": 3.5})
    r.expire("board", 60)
    zadd, expire = sorted(published.ops(), key=lambda op: str(op.commands[0][0]), reverse=True)
    assert zadd.commands == ops.zadd("board", {"ada": 3.5}).commands
    assert expire.commands[0][0] == "PEXPIREAT"


def test_wrap_keeps_the_client_usable_and_refuses_what_it_cannot_capture(redis_server: RedisServer) -> None:
    import redis.asyncio

    plain = fast_client(redis_server)
    # Settings of its own: whichever Celery app is current in this process names other servers.
    producer: Any = _SettingsOnly({"default": redis_server.url})
    r = celery_redis_retry.wrap(plain, producer=producer)
    again = celery_redis_retry.wrap(r, source="Other.place", producer=producer)
    assert again.uncaptured is plain  # wrapping a wrapped client wraps the original
    assert type(r.client()) is type(r)  # a single-connection client keeps capturing
    assert r.client().set("k", "v") is True
    wrapped_async = celery_redis_retry.wrap(redis.asyncio.Redis(port=redis_server.port), producer=producer)
    assert isinstance(wrapped_async, redis.asyncio.Redis)  # asyncio clients: see tests/test_async_capture.py
    assert type(wrapped_async.client()) is type(wrapped_async)
    with pytest.raises(TypeError, match="redis-py client"):
        celery_redis_retry.wrap(object())
    r.close()


# -- a client of another server than its target's ---------------------------------------------


class _SettingsOnly:
    """Stands in for a producer: wrap() reads only its settings before a write fails."""

    def __init__(self, targets: dict[str, str]) -> None:
        self.settings = Settings.from_mapping({
            "redis_retry_kafka": {"bootstrap.servers": "127.0.0.1:1"}, "redis_retry_targets": targets,
        })


def test_wrap_refuses_a_client_of_another_server_than_its_targets(
    redis_server: RedisServer, redis_factory: Any
) -> None:
    other = redis_factory()
    producer: Any = _SettingsOnly({"default": redis_server.url, "sessions": f"redis://localhost:{other.port}/2"})
    with pytest.raises(celery_redis_retry.ConfigurationError) as refused:
        celery_redis_retry.wrap(fast_client(other), producer=producer)
    assert str(refused.value) == (
        f"wrap(target='default'): the client talks to 127.0.0.1:{other.port} db 0 but "
        f"redis_retry_targets['default'] is 127.0.0.1:{redis_server.port} db 0 ({redis_server.url}): its failed "
        "writes would be replayed on another server; wrap it with the target that names its server"
    )
    with pytest.raises(celery_redis_retry.ConfigurationError, match=r"db 0 but .*\['sessions'\] is .* db 2"):
        celery_redis_retry.wrap(fast_client(other), producer=producer, target="sessions")
    with pytest.raises(celery_redis_retry.ConfigurationError, match=r"no such target .*\(default, sessions\)"):
        celery_redis_retry.wrap(fast_client(other), producer=producer, target="orders")
    # Its own target's server: accepted, and its writes land there (localhost and 127.0.0.1 are one host).
    sessions = celery_redis_retry.wrap(fast_client(other, db=2), producer=producer, target="sessions")
    assert sessions.set("k", "v") is True
    mine = celery_redis_retry.wrap(redis.Redis(host="localhost", port=redis_server.port), producer=producer)
    assert mine.set("k", "v") is True
    with fast_client(other, db=2) as check:
        assert check.get("k") == b"v"


def test_wrap_compares_unix_sockets_and_sentinel_services(redis_factory: Any, tmp_path: Path) -> None:
    from redis.sentinel import Sentinel

    socket = str(tmp_path / "redis.sock")
    server = redis_factory(args=("--unixsocket", socket))
    producer: Any = _SettingsOnly({"default": f"unix://{socket}", "tcp": server.url,
                                   "sessions": "redis+sentinel://127.0.0.1:26379/sessions/0"})
    assert celery_redis_retry.wrap(redis.Redis(unix_socket_path=socket), producer=producer).set("k", "v") is True
    with pytest.raises(celery_redis_retry.ConfigurationError, match=r"unix socket .* but .*\['tcp'\] is 127.0.0.1"):
        celery_redis_retry.wrap(redis.Redis(unix_socket_path=socket), producer=producer, target="tcp")
    sentinel = Sentinel([("127.0.0.1", 26379)])  # never contacted: wrap() reads the pool's service name
    celery_redis_retry.wrap(sentinel.master_for("sessions"), producer=producer, target="sessions")
    with pytest.raises(celery_redis_retry.ConfigurationError, match="Sentinel service 'carts' db 0 but"):
        celery_redis_retry.wrap(sentinel.master_for("carts"), producer=producer, target="sessions")
    # An asyncio Sentinel client's pool names its service too.
    from redis.asyncio.sentinel import Sentinel as AsyncSentinel

    async_sentinel = AsyncSentinel([("127.0.0.1", 26379)])
    celery_redis_retry.wrap(async_sentinel.master_for("sessions"), producer=producer, target="sessions")
    with pytest.raises(celery_redis_retry.ConfigurationError, match="Sentinel service 'carts' db 0 but"):
        celery_redis_retry.wrap(async_sentinel.master_for("carts"), producer=producer, target="sessions")


def test_wrap_accepts_a_cluster_client_whose_cluster_has_the_targets_node(tmp_path: Path, redis_factory: Any) -> None:
    from celery_redis_retry.testing import RedisCluster

    with RedisCluster(3, dir=str(tmp_path / "cluster")) as cluster:
        last = cluster.nodes[-1].port
        stranger = redis_factory().port
        producer: Any = _SettingsOnly({"default": f"redis+cluster://127.0.0.1:{last}",
                                       "other": f"redis+cluster://127.0.0.1:{stranger}"})
        client = cluster.client()  # started from the first node; the others are discovered
        try:
            assert celery_redis_retry.wrap(client, producer=producer).set("k", "v") is True
            with pytest.raises(celery_redis_retry.ConfigurationError, match=r"Redis Cluster of .* but"):
                celery_redis_retry.wrap(client, producer=producer, target="other")
            with cluster.nodes[-1].client() as node, \
                    pytest.raises(celery_redis_retry.ConfigurationError, match=r"but .* Redis Cluster"):
                celery_redis_retry.wrap(node, producer=producer)
            # An asyncio cluster client is compared by its nodes too (before it connects: its startup node).
            import redis.asyncio.cluster

            async_client = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=last)
            celery_redis_retry.wrap(async_client, producer=producer)
            with pytest.raises(celery_redis_retry.ConfigurationError, match=r"Redis Cluster of .* but"):
                celery_redis_retry.wrap(async_client, producer=producer, target="other")
        finally:
            client.close()


def test_wrap_checks_the_server_at_once_against_the_installed_apps_settings(
    redis_server: RedisServer, redis_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery import Celery

    from celery_redis_retry.capture import guard as capture

    other = redis_factory()
    app = Celery("web", set_as_current=False)
    app.conf.update(redis_retry_kafka={"bootstrap.servers": "127.0.0.1:1"},
                    redis_retry_targets={"default": redis_server.url},
                    redis_retry_spool_path=str(tmp_path / "spool.sqlite3"))
    monkeypatch.setattr(capture, "_app", None)
    monkeypatch.setattr(capture, "_producer", None)
    celery_redis_retry.install(app)
    with pytest.raises(celery_redis_retry.ConfigurationError, match=f"127.0.0.1:{other.port} db 0 but"):
        celery_redis_retry.wrap(fast_client(other))
    celery_redis_retry.wrap(fast_client(redis_server))
    assert capture._producer is None  # checked without creating the producer


def test_wrap_before_the_settings_checks_the_server_at_the_first_write(
    redis_server: RedisServer, redis_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery import Celery

    from celery_redis_retry.capture import guard as capture

    other = redis_factory()
    app = Celery("configured_after_wrap", set_as_current=False)
    monkeypatch.setattr(capture, "_app", app)
    monkeypatch.setattr(capture, "_producer", None)
    wrapped = celery_redis_retry.wrap(fast_client(other))  # no settings yet: nothing to compare with
    app.conf.update(redis_retry_kafka={"bootstrap.servers": "127.0.0.1:1"},
                    redis_retry_targets={"default": redis_server.url},
                    redis_retry_spool_path=str(tmp_path / "spool.sqlite3"))
    try:
        for _ in range(2):  # refused at every write until the settings are fixed
            with pytest.raises(celery_redis_retry.ConfigurationError, match=f"127.0.0.1:{other.port} db 0 but"):
                wrapped.set("k", "v")
        with fast_client(other) as check:
            assert check.get("k") is None
    finally:
        if capture._producer is not None:
            capture._producer.close(0)


def test_an_outage_of_a_target_is_one_warning_then_one_info_with_op_ids_at_debug(
    redis_server: RedisServer, published: Published, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="celery_redis_retry")
    WRITE_OUTAGES.ended("sessions")  # the process-wide outage another test of this module left open
    r = celery_redis_retry.wrap(fast_client(redis_server), producer=published.producer, target="sessions")
    assert r.set("up", "1") is True
    redis_server.stop()
    for n in range(6):
        assert r.set(f"user:{n}", "x") is None
    assert r.incrby("visits", 1) is None
    pipe = r.pipeline()
    pipe.set("a", 1).lpush("l", "x")
    assert pipe.execute() is None
    with pytest.raises(redis.ConnectionError):
        r.get("user:0")  # reads are not captured and end nothing
    ids = [op.id for op in published.ops()]
    assert len(ids) == 8

    def said(level: int) -> list[str]:
        return [rec.getMessage() for rec in caplog.records if rec.name == "celery_redis_retry.capture.capturing"
                and rec.levelno == level]

    warned = said(logging.WARNING)
    assert len(warned) == 1, warned
    assert warned[0].startswith("writes to target 'sessions' fail (ConnectionError: ")
    assert sum(i in warned[0] for i in ids) == 1  # the first op, named
    assert all(any(i in line for line in said(logging.DEBUG)) for i in ids)  # every op id, at DEBUG

    redis_server.start()
    assert r.get("user:0") is None  # a read that works ends nothing: a replica answers reads, not writes
    assert said(logging.INFO) == []
    assert r.set("back", "1") is True
    assert len(said(logging.INFO)) == 1
    assert said(logging.INFO)[0].startswith("target 'sessions' takes writes again: 8 failed writes in ")
    assert r.set("again", "1") is True
    assert len([rec for rec in caplog.records if rec.name == "celery_redis_retry.capture.capturing"
                and rec.levelno >= logging.INFO]) == 2
