"""Shared fixtures: real redis-server processes, Kafka-protocol brokers and RabbitMQ detection.

Every fixture starts the real thing with :mod:`celery_redis_retry.testing`; one that
cannot start what it needs errors loudly instead of skipping (RabbitMQ, an external
service, is the one explained exception: see :func:`rabbitmq_url`).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from loop_stack import LoopStack

from celery_redis_retry.testing import (
    EmbeddedKafka,
    KafkaBroker,
    RedisCluster,
    RedisSentinel,
    RedisServer,
    TansuKafka,
    free_port,
)

APPS_DIR = Path(__file__).parent / "apps"
RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A started redis-server on a free port, stopped after the test."""
    with RedisServer(dir=str(tmp_path_factory.mktemp("redis"))).start() as server:
        yield server


@pytest.fixture
def redis_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RedisServer]]:
    """``redis_factory(port=None, args=())`` starts another redis-server; all are stopped after."""
    servers: list[RedisServer] = []

    def start(port: int | None = None, args: tuple[str, ...] | list[str] = (), **kwargs: Any) -> RedisServer:
        server = RedisServer(port, args=args, dir=str(tmp_path_factory.mktemp("redis")))
        servers.append(server)
        return server.start(**kwargs)

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedKafka]:
    """The embedded broker (librdkafka's mock cluster), shared by the session: never stop it in a test."""
    with EmbeddedKafka(log_dir=tmp_path_factory.mktemp("dev-kafka")).start() as broker:
        yield broker


@pytest.fixture(scope="session")
def tansu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TansuKafka]:
    """A Tansu broker shared by the session: never stop it in a test; create topics before subscribing."""
    with TansuKafka(log_dir=tmp_path_factory.mktemp("tansu")).start() as broker:
        yield broker


@pytest.fixture(params=["kafka", "tansu"])
def kafka_broker(request: pytest.FixtureRequest) -> KafkaBroker:
    """Each session broker in turn: the test runs once on the mock cluster and once on Tansu."""
    broker: KafkaBroker = request.getfixturevalue(request.param)
    return broker


@pytest.fixture
def unique_topic() -> str:
    """A topic name no other test uses."""
    return f"t-{uuid.uuid4().hex}"


@pytest.fixture
def rabbitmq_url() -> str:
    """The local RabbitMQ's URL; skips visibly when it is absent, fails if CRR_REQUIRE_RABBITMQ=1."""
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=1.0).close()
    except OSError as exc:
        reason = f"RabbitMQ is not reachable on 127.0.0.1:5672 ({exc})"
        if os.environ.get("CRR_REQUIRE_RABBITMQ") == "1":
            pytest.fail(f"{reason}, and CRR_REQUIRE_RABBITMQ=1")
        pytest.skip(f"{reason}; set CRR_REQUIRE_RABBITMQ=1 to make this a failure")
    return RABBITMQ_URL


@pytest.fixture
def make_loop(
    kafka: EmbeddedKafka, redis_factory: Callable[..., RedisServer], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., LoopStack]]:
    """``make_loop(broker_url=None, target_running=True, **LoopStack options)``: the whole loop.

    The target Redis gets a fixed port (so it can be started later, or killed and
    restarted, at the same URL) and an append-only file (so a graceful stop keeps data);
    with ``cluster=True`` it is a started 3-master Redis Cluster instead, with ``sentinel=True``
    a master, a replica and a Sentinel.
    The Celery broker is a fresh redis-server unless ``broker_url`` is given.
    """
    stacks: list[LoopStack] = []

    def make(
        *, broker_url: str | None = None, target_running: bool = True, cluster: bool = False, sentinel: bool = False,
        target_args: tuple[str, ...] = (), **options: Any,
    ) -> LoopStack:
        workdir = tmp_path_factory.mktemp("loop")
        target: RedisServer | RedisCluster | RedisSentinel
        if cluster:
            target = RedisCluster(3, dir=str(workdir / "cluster")).start()
        elif sentinel:
            target = RedisSentinel(dir=str(workdir / "sentinel")).start()
        else:
            target = RedisServer(free_port(), args=("--appendonly", "yes", *target_args), dir=str(workdir))
            if target_running:
                target.start()
        broker = None if broker_url else redis_factory(args=("--appendonly", "yes"))
        stack = LoopStack(kafka, target, broker_url or broker.url, workdir, broker=broker, **options)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()
        stack.target.stop()
