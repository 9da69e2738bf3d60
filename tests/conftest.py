"""Shared fixtures: real redis-server (and valkey-server) processes, Kafka-protocol brokers and RabbitMQ.

Every fixture starts the real thing with :mod:`celery_redis_retry.testing`; one that
cannot start what it needs errors loudly instead of skipping (RabbitMQ, a system package
rather than a Python one, is the one explained exception: see :func:`rabbitmq_server`).

Tests marked ``redis_and_valkey`` run twice, with ids ``[redis]`` and ``[valkey]``: once
against redis-server, once against valkey-server as the *target* server (the
``target_server`` fixture, used by ``redis_server`` and ``make_loop``'s target). Celery's
broker stays a redis-server either way.

A test that starts a process, or takes over a few seconds, must be marked ``slow``: the
hooks below fail a run where one is not (docs/testing.md, "The quick run").
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from loop_stack import LoopStack

from celery_redis_retry.testing import (
    ApacheKafka,
    EmbeddedKafka,
    HarnessError,
    KafkaBroker,
    RabbitMQServer,
    RedisCluster,
    RedisSentinel,
    RedisServer,
    TansuKafka,
    quiet_port,
    rabbitmq_server_binary,
    redis_server_binary,
    valkey_server_binary,
)

APPS_DIR = Path(__file__).parent / "apps"

#: Start-up times of the shared services, printed at the end of the run.
HARNESS_TIMINGS: list[str] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Report how long the shared services took to start, and the tests that must be marked slow."""
    if HARNESS_TIMINGS:
        terminalreporter.section("harness start-up")
        for line in HARNESS_TIMINGS:
            terminalreporter.write_line(line)
    if UNMARKED_SLOW_TESTS:
        terminalreporter.section("tests that must be marked slow", red=True)
        for line in UNMARKED_SLOW_TESTS:
            terminalreporter.write_line(line)
        terminalreporter.write_line(
            "mark the file (pytestmark = pytest.mark.slow) or the test (@pytest.mark.slow): "
            "`pytest -m \"not slow\"` is the quick run, see docs/testing.md"
        )


# -- the slow marker, kept true -------------------------------------------------------------
# A test not marked ``slow`` must neither start a process nor take long. Python's audit
# hooks (PEP 578) see every process this interpreter starts, however it is started (the
# harness's classes, subprocess.run of the CLI, os.fork); the durations come from pytest's
# own reports. Both are measured in every run, so the marker cannot drift out of date.

#: What a test not marked ``slow`` may take, setup and call together (the rule is ~2 s; the
#: margin is for a busy machine).
FAST_TEST_LIMIT_S = 5.0

#: Audit events raised when this interpreter starts another process.
PROCESS_EVENTS = frozenset({"subprocess.Popen", "os.posix_spawn", "os.spawn", "os.system", "os.fork", "os.forkpty"})

#: Filled at the end of the run: one line per test that breaks the rule.
UNMARKED_SLOW_TESTS: list[str] = []


class ProcessStarts:
    """Counts the processes this interpreter starts and keeps what the latest one was."""

    def __init__(self) -> None:
        self.count = 0
        self.latest = ""

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        # Called for every audit event (every open, import, compile...): the set lookup first.
        # It must never raise: an exception here would fail the fork or Popen itself.
        if event in PROCESS_EVENTS:
            self.count += 1
            what = args[1] if event == "subprocess.Popen" and len(args) > 1 else args[:2]
            self.latest = f"{event} {what!r}"[:160]


PROCESS_STARTS = ProcessStarts()
sys.addaudithook(PROCESS_STARTS)  # an audit hook cannot be removed: installed once, at import

#: Fixtures whose setup started a process (seen in this run), e.g. the session's brokers.
#: The definitions, not the names: a test file may define a fixture of the same name.
PROCESS_FIXTURES: set[pytest.FixtureDef[Any]] = set()

#: Per test not marked slow: the fixtures it uses by name, and the latest process it
#: started itself ("" if none).
_FAST_TESTS: dict[str, tuple[dict[str, pytest.FixtureDef[Any]], str]] = {}

#: Per test: its setup and call time in seconds. Teardown is left out: the last test's
#: teardown also stops the session's servers.
_SECONDS: dict[str, float] = {}


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any]) -> Iterator[Any]:
    before = PROCESS_STARTS.count
    try:
        return (yield)
    finally:
        if PROCESS_STARTS.count > before:
            PROCESS_FIXTURES.add(fixturedef)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[Any]:
    if item.get_closest_marker("slow") is not None:
        return (yield)
    before = PROCESS_STARTS.count
    try:
        return (yield)
    finally:
        started = PROCESS_STARTS.latest if PROCESS_STARTS.count > before else ""
        _FAST_TESTS[item.nodeid] = (_fixtures_used(item), started)


def _fixtures_used(item: pytest.Item) -> dict[str, pytest.FixtureDef[Any]]:
    """The fixture definitions a test uses, directly or through other fixtures, by name."""
    info = getattr(item, "_fixtureinfo", None)  # pytest's own record; absent on non-Python items
    if info is None:
        return {}
    # The last definition of a name is the one in effect (the closest override).
    return {name: defs[-1] for name, defs in info.name2fixturedefs.items() if defs}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when in ("setup", "call"):
        _SECONDS[report.nodeid] = _SECONDS.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Fail the run when a test not marked slow started a process or took over the limit."""
    quick_run = "not slow" in (session.config.getoption("markexpr", "") or "")
    for nodeid, (fixtures, started) in _FAST_TESTS.items():
        seconds = _SECONDS.get(nodeid, 0.0)
        reasons = []
        if started:
            reasons.append(f"started a process ({started})")
        if process_fixtures := sorted(name for name, fixturedef in fixtures.items() if fixturedef in PROCESS_FIXTURES):
            reasons.append(f"uses fixtures that start processes ({', '.join(process_fixtures)})")
        # Time is judged in the quick run only: in the whole suite the slow tests' servers
        # share the two cores, and a fast test's time says more about them than about it.
        if seconds > FAST_TEST_LIMIT_S and quick_run:
            reasons.append(f"took {seconds:.1f} s (limit {FAST_TEST_LIMIT_S:g} s)")
        if reasons:
            UNMARKED_SLOW_TESTS.append(f"{nodeid}: {'; '.join(reasons)}")
    if UNMARKED_SLOW_TESTS and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave out the ``extended`` tests unless asked for (``-m extended``, ``CRR_EXTENDED=1``).

    They are long scenarios whose fault the short chaos profile plays in every run with full
    accounting; ``make chaos`` runs them. Deselected, not skipped: they count as neither.
    """
    if os.environ.get("CRR_EXTENDED") == "1" or "extended" in (config.getoption("markexpr", "") or ""):
        return
    extended = [item for item in items if item.get_closest_marker("extended") is not None]
    if extended:
        config.hook.pytest_deselected(items=extended)
        items[:] = [item for item in items if item.get_closest_marker("extended") is None]


#: The target servers a ``redis_and_valkey`` test runs against; the names are the test ids.
TARGET_SERVERS: dict[str, Callable[[], str]] = {"redis": redis_server_binary, "valkey": valkey_server_binary}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # A marker rather than params on the fixture: only the tests that ask run twice, not
    # every test that happens to use make_loop.
    if metafunc.definition.get_closest_marker("redis_and_valkey") and "target_server" in metafunc.fixturenames:
        metafunc.parametrize("target_server", list(TARGET_SERVERS), indirect=True)


@pytest.fixture
def target_server(request: pytest.FixtureRequest) -> str:
    """The binary of the target server: valkey-server in the ``[valkey]`` run of a ``redis_and_valkey`` test.

    Fails (never skips) if it is missing: valkey-server comes with the ``test`` extra.
    """
    return TARGET_SERVERS[getattr(request, "param", "redis")]()


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory, target_server: str) -> Iterator[RedisServer]:
    """A started target server (redis-server, or valkey-server: see ``target_server``), stopped after the test."""
    with RedisServer(dir=str(tmp_path_factory.mktemp("redis")), binary=target_server).start() as server:
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


def _skip_unless_required(missing: HarnessError, variable: str) -> None:
    """Skip the test, naming what is missing, or fail it when ``variable`` is 1 (as on CI)."""
    if os.environ.get(variable) == "1":
        pytest.fail(f"{missing}, and {variable}=1")
    pytest.skip(f"{missing}; set {variable}=1 to make this a failure")


def _apache_kafka(tmp_path_factory: pytest.TempPathFactory, brokers: int, **options: Any) -> Iterator[ApacheKafka]:
    """Start an Apache Kafka cluster, or skip visibly where Java or Maven is missing (never on CI)."""
    try:
        cluster = ApacheKafka(brokers, dir=tmp_path_factory.mktemp(f"apache-kafka-{brokers}"), **options)
    except HarnessError as exc:
        _skip_unless_required(exc, "CRR_REQUIRE_KAFKA")
    cluster.start()
    HARNESS_TIMINGS.append(f"Apache Kafka {cluster.version}, {brokers} broker(s): {cluster.start_seconds:.1f}s")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def apache_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApacheKafka]:
    """One Apache Kafka broker (KRaft, auto-create off) shared by the session: never stop it in a test."""
    yield from _apache_kafka(tmp_path_factory, 1)


@pytest.fixture(scope="session")
def kafka_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApacheKafka]:
    """Three Apache Kafka brokers (RF 3, min.insync.replicas 2, auto-create off) shared by the session.

    A test may kill, pause or restart one node, but must leave every node running when it ends.
    """
    yield from _apache_kafka(tmp_path_factory, 3)


#: The SCRAM users of ``secure_kafka``: one principal per kind of process, and one with no ACL.
SCRAM_USERS = {"app": "app-secret", "bridge": "bridge-secret", "worker": "worker-secret",
               "operator": "operator-secret", "outsider": "outsider-secret"}


@pytest.fixture(scope="session")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApacheKafka]:
    """One Apache Kafka broker with a SASL_SSL listener, :data:`SCRAM_USERS` and ACLs enforced."""
    yield from _apache_kafka(tmp_path_factory, 1, scram_users=SCRAM_USERS)


@pytest.fixture(params=["kafka", "tansu"])
def kafka_broker(request: pytest.FixtureRequest) -> KafkaBroker:
    """Each session broker in turn: the test runs once on the mock cluster and once on Tansu."""
    broker: KafkaBroker = request.getfixturevalue(request.param)
    return broker


@pytest.fixture
def unique_topic() -> str:
    """A topic name no other test uses."""
    return f"t-{uuid.uuid4().hex}"


@pytest.fixture(scope="session")
def rabbitmq_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQServer]:
    """A RabbitMQ broker on a free port, started on first use and shared by the session: never stop it in a test.

    Without a rabbitmq-server binary the tests that need it skip, with the reason, unless
    CRR_REQUIRE_RABBITMQ=1 (as on CI), which makes that a failure.
    """
    try:
        rabbitmq_server_binary()
    except HarnessError as exc:
        _skip_unless_required(exc, "CRR_REQUIRE_RABBITMQ")
    with RabbitMQServer(dir=str(tmp_path_factory.mktemp("rabbitmq"))).start() as server:
        yield server


@pytest.fixture
def rabbitmq_url(rabbitmq_server: RabbitMQServer) -> str:
    """The AMQP URL of the session's RabbitMQ (see :func:`rabbitmq_server`)."""
    return rabbitmq_server.url


@pytest.fixture
def make_loop(
    kafka: EmbeddedKafka, redis_factory: Callable[..., RedisServer], tmp_path_factory: pytest.TempPathFactory,
    target_server: str,
) -> Iterator[Callable[..., LoopStack]]:
    """``make_loop(broker_url=None, target_running=True, **LoopStack options)``: the whole loop.

    The target Redis gets a fixed port (so it can be started later, or killed and
    restarted, at the same URL) and an append-only file (so a graceful stop keeps data);
    with ``cluster=True`` it is a started 3-master Redis Cluster instead, with ``sentinel=True``
    a master, a replica and a Sentinel. Each runs ``target_server`` (redis-server, or valkey-server).
    The Celery broker is a fresh redis-server unless ``broker_url`` is given; Kafka is the
    session's embedded broker unless ``kafka_broker`` is given (``kafka_cluster``, say). The
    ops and DLQ topics are created first, as an operator would on a cluster that does not
    auto-create them.
    """
    stacks: list[LoopStack] = []

    def make(
        *, broker_url: str | None = None, target_running: bool = True, cluster: bool = False, sentinel: bool = False,
        target_args: tuple[str, ...] = (), kafka_broker: KafkaBroker | ApacheKafka | None = None,
        create_topics: bool = True, sentinel_down_after_ms: int = 1000, broker_args: tuple[str, ...] = (),
        **options: Any,
    ) -> LoopStack:
        workdir = tmp_path_factory.mktemp("loop")
        target: RedisServer | RedisCluster | RedisSentinel
        if cluster:
            target = RedisCluster(3, dir=str(workdir / "cluster"), binary=target_server).start()
        elif sentinel:
            target = RedisSentinel(dir=str(workdir / "sentinel"), binary=target_server,
                                   down_after_ms=sentinel_down_after_ms).start()
        else:
            target = RedisServer(  # killed while clients reconnect: a port no client can be given as its own
                quiet_port(), args=("--appendonly", "yes", *target_args), dir=str(workdir), binary=target_server
            )
            if target_running:
                target.start()
        # The Celery broker may be killed under reconnecting clients too: a quiet port.
        broker = None if broker_url else redis_factory(quiet_port(), args=("--appendonly", "yes", *broker_args))
        stack = LoopStack(kafka_broker or kafka, target, broker_url or broker.url, workdir, broker=broker, **options)
        if create_topics:
            stack.create_topics()
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop(graceful=False)
        stack.target.stop()
