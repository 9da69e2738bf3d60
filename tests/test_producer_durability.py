"""No loss on the producer side, shown with real processes (see docs/producer-durability.md).

Every scenario runs the publishing application as its own process
(``tests/apps/durability_publisher.py`` or a prefork Celery worker running
``tests/apps/durability_app.py``), against a real Kafka-protocol broker, and kills
what a production incident would kill: the broker, the application (SIGKILL or
SIGTERM), a worker. The application appends each op to a file once ``publish``
returned it, so the tests know exactly what the producer was handed; they then
account for every one of those ops, byte for byte, in Kafka or in the spool.

Each test prints the figures it measured (``[durability] ...``; run pytest with
``-s`` to see them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from celery_redis_retry.capture.spool import Spool
from celery_redis_retry.message import decode
from celery_redis_retry.testing import (
    CeleryWorker,
    ManagedProcess,
    RedisServer,
    TansuKafka,
    TopicRecord,
    free_port,
    read_topic,
    wait_until,
)

APPS_DIR = Path(__file__).parent / "apps"
PUBLISHER = APPS_DIR / "durability_publisher.py"
#: What librdkafka writes when a handle is destroyed with messages still in it.
STILL_IN_QUEUE = "still in queue or transit"

pytestmark = pytest.mark.slow


# -- helpers ---------------------------------------------------------------------------------


def _env(bootstrap: str, topic: str, spool: Path, *, durable: bool = False, **extra: str) -> dict[str, str]:
    return {
        "CRR_BOOTSTRAP": bootstrap,
        "CRR_TOPIC": topic,
        "CRR_SPOOL": str(spool),
        "CRR_DURABLE": "1" if durable else "0",
        "CRR_LIBRDKAFKA_STDERR": "1",
        **extra,
    }


def _publisher(tmp_path: Path, env: dict[str, str], *args: str) -> tuple[ManagedProcess, Path]:
    out = tmp_path / f"published-{uuid.uuid4().hex[:8]}.jsonl"
    process = ManagedProcess(
        [sys.executable, str(PUBLISHER), "--out", str(out), *args], env=env, cwd=str(APPS_DIR),
        name="publisher", log_dir=tmp_path,
    )
    return process, out


def _lines(out: Path) -> int:
    return out.read_bytes().count(b"\n") if out.exists() else 0


def _published(out: Path) -> dict[str, bytes]:
    """Op id -> the op's message, for every op whose ``publish`` returned (in order)."""
    published: dict[str, bytes] = {}
    for line in out.read_bytes().split(b"\n")[:-1]:  # a line is written whole, after publish returned
        op_id = decode(line).id
        assert op_id not in published, f"op {op_id} published twice by the app"
        published[op_id] = line
    return published


def _by_id(values: Iterable[bytes]) -> dict[str, list[bytes]]:
    found: dict[str, list[bytes]] = {}
    for value in values:
        found.setdefault(decode(value).id, []).append(value)
    return found


def _topic_values(bootstrap: str, topic: str, *, idle: float = 2.0, timeout: float = 60.0) -> list[bytes]:
    records: list[TopicRecord] = read_topic(bootstrap, topic, idle=idle, timeout=timeout)
    return [r.value or b"" for r in records]


def _spooled_values(path: Path) -> list[bytes]:
    """Every message in the spool file, oldest first (taking and giving back the drain lease)."""
    spool = Spool(str(path))
    try:
        messages = spool.claim(10**7, lease=5.0)
        spool.release()
        return [m.value for m in messages]
    finally:
        spool.close()


def _check_exact(published: dict[str, bytes], found: dict[str, list[bytes]], *, interrupted: bool = False) -> None:
    """Whatever arrived is byte for byte what was published, and nothing else arrived.

    ``interrupted``: the app was stopped by a signal in its publishing loop, so the op
    whose ``publish`` had not returned yet may have arrived without its line in the
    file; it can only be the next op of the sequence.
    """
    unknown = set(found) - set(published)
    if interrupted:
        assert all(decode(found[u][0]).context.get("seq") == str(len(published)) for u in unknown), unknown
        assert len(unknown) <= 1, unknown
    else:
        assert not unknown, f"{len(unknown)} ops arrived that the app never published"
    for op_id, copies in found.items():
        if op_id in unknown:
            continue
        original = published[op_id]
        for copy in copies:
            assert copy == original, f"op {op_id} changed on the way"
            assert decode(copy) == decode(original)


def _drain_with_cli(env: dict[str, str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "durability_app", "redis-retry", "spool", "drain",
         "--timeout", str(timeout)],
        cwd=str(APPS_DIR), env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout + 60,
        check=False,
    )


def _exit_code(process: ManagedProcess, timeout: float) -> int:
    """Wait for ``process`` to end by itself; its exit code (negative: the signal)."""
    wait_until(lambda: process.returncode is not None, timeout, what=f"{process.name} to exit")
    code = process.returncode
    assert code is not None
    return code


def _wait_for_report(app: ManagedProcess, timeout: float) -> dict[str, Any]:
    """The counters the publisher prints once settled; it must then exit 0."""
    report = json.loads(app.wait_for_log(r"^REPORT (.*)$", timeout=timeout).group(1))
    assert _exit_code(app, 30) == 0, app.log_tail()
    return dict(report)


def _report(name: str, figures: dict[str, Any]) -> None:
    print(f"\n[durability] {name}: {json.dumps(figures)}", flush=True)


# -- 1. the broker dies and comes back -----------------------------------------------------------


def test_broker_down_killed_and_restarted_loses_nothing_published(tmp_path: Path) -> None:
    """20,000 ops at 1,000/s over an outage at start and a broker killed mid-stream.

    What is claimed: every op that ``publish`` returned reached a Kafka broker. Tansu
    keeps its log in memory, so a killed Tansu forgets ops it had acknowledged; the
    producer cannot be blamed for those, and they cannot be told apart from lost ones
    by reading the restarted broker. So the test makes the acknowledged set knowable:

    1. Tansu is down when the app starts: the first ~3,000 ops must go to the spool.
    2. Tansu starts (same port); the spool drains while publishing goes on.
    3. At ~7,000 ops the app is frozen (SIGSTOP): nothing new leaves it. The test reads
       the whole topic (S: everything the broker appended, a superset of what it could
       have acknowledged), then SIGKILLs Tansu and lets the app run on (SIGCONT).
       Requests the app had not sent, or whose answer it never read, are its problem
       again: they must come back.
    4. 10 s later a fresh Tansu starts on the same port; the app finishes its 20,000
       ops, waits until nothing is pending and its spool is empty, and exits.
    5. T is the new broker's topic. Every published op must be in S or T, byte for
       byte; ops only in S are the ones the dead broker took with it. Duplicates (an op
       twice in T, or in both S and T) are counted and reported, not failed: op ids and
       the replay's dedupe markers make them harmless.
    """
    topic = f"durability-{uuid.uuid4().hex[:8]}"
    broker = TansuKafka(port=free_port(), log_dir=tmp_path)
    env = _env(broker.bootstrap_servers, topic, tmp_path / "spool.sqlite3")
    app, out = _publisher(tmp_path, env, "--count", "20000", "--rate", "1000", "--then", "settle",
                          "--settle-timeout", "90")
    try:
        started = time.monotonic()
        app.start()
        app.wait_until(lambda: _lines(out) >= 3000, 30, "3,000 ops published with Kafka down")
        spooled_while_down = len(_spooled_values(tmp_path / "spool.sqlite3"))
        broker.start()
        broker.create_topic(topic)
        first_start = time.monotonic()
        app.wait_until(lambda: _lines(out) >= 7000, 30, "7,000 ops published")

        assert app.pid is not None
        os.kill(app.pid, signal.SIGSTOP)
        try:
            appended_before_kill = _by_id(_topic_values(broker.bootstrap_servers, topic, idle=1.5))
            broker.kill()
        finally:
            os.kill(app.pid, signal.SIGCONT)
        published_at_kill = _lines(out)
        time.sleep(10)
        published_at_restart = _lines(out)
        broker.start()
        broker.create_topic(topic)
        restarted = time.monotonic()
        app_report = _wait_for_report(app, timeout=120)
        settled = time.monotonic()

        published = _published(out)
        assert len(published) == 20000
        after = _by_id(_topic_values(broker.bootstrap_servers, topic))
        spool_left = _spooled_values(tmp_path / "spool.sqlite3")
    finally:
        app.kill()
        broker.stop()

    _check_exact(published, appended_before_kill)
    _check_exact(published, after)
    missing = set(published) - set(appended_before_kill) - set(after)
    only_in_dead_broker = set(appended_before_kill) - set(after)
    duplicates_after = sum(len(c) - 1 for c in after.values())
    figures = {
        "published": len(published),
        "spooled_while_kafka_was_down_at_start": spooled_while_down,
        "published_before_kill": published_at_kill,
        "published_during_outage": published_at_restart - published_at_kill,
        "appended_before_kill": len(appended_before_kill),
        "arrived_after_restart": len(after),
        "only_in_the_killed_broker": len(only_in_dead_broker),
        "in_both_brokers": len(set(appended_before_kill) & set(after)),
        "duplicates_after_restart": duplicates_after,
        "missing": len(missing),
        "missing_positions": [i for i, op_id in enumerate(published) if op_id in missing][:: max(1, len(missing) // 8)],
        "spool_left": len(spool_left),
        "app": app_report,
        "first_start_after_s": round(first_start - started, 1),
        "all_settled_after_restart_s": round(settled - restarted, 1),
    }
    _report("broker down, killed, restarted", figures)
    assert not missing, f"{len(missing)} published ops reached no broker: {figures}"
    assert not spool_left
    assert spooled_while_down > 0
    assert app_report["spool_left"] == 0
    assert app_report["pending"] == 0


# -- 2. the application is SIGKILLed right after publish returned -------------------------------------

#: (mode, Kafka, ops, rate): durable publishing waits for each ack or fsync, so fewer ops.
SIGKILL_CASES = [
    ("default", "up", 15000, 5000),
    ("default", "up-cold", 20000, 0),
    ("default", "refusing", 5000, 0),
    ("default", "hung", 3000, 0),
    ("durable", "up", 1500, 0),
    ("durable", "refusing", 1000, 0),
    ("durable", "hung", 1000, 0),
]


@pytest.mark.parametrize("case", SIGKILL_CASES, ids=[f"{m}-{k}" for m, k, _, _ in SIGKILL_CASES])
def test_sigkill_right_after_publish_returned(
    tansu: TansuKafka, tmp_path: Path, case: tuple[str, str, int, int]
) -> None:
    """SIGKILL the app the instant its last ``publish`` returned; count what survives.

    The app publishes (at ``rate`` ops/s, or as fast as it can) and SIGKILLs itself
    right after the last ``publish`` returned: no flush, no atexit, the worst moment. A
    fresh process (``celery -A durability_app redis-retry spool drain``) then drains the
    same spool file into Kafka, and every op the app had been given back an id for is
    looked for in the topic. Kafka is ``up`` (Tansu, the app publishing steadily for
    3 s), ``up-cold`` (a burst from process start, before the first connection and
    producer id are set up), ``refusing`` (nothing listens on the port) or ``hung`` (a
    Tansu frozen with SIGSTOP: connections open, nothing answered).

    Durable mode must lose nothing. Default mode loses what librdkafka held in memory,
    not yet acknowledged: the figures are reported, and bounded where they can be.
    """
    mode, kafka_state, count, rate = case
    topic = f"durability-{uuid.uuid4().hex[:8]}"
    spool = tmp_path / "spool.sqlite3"
    hung: TansuKafka | None = None
    if kafka_state.startswith("up"):
        tansu.create_topic(topic)
        bootstrap = tansu.bootstrap_servers
    elif kafka_state == "refusing":
        bootstrap = f"127.0.0.1:{free_port()}"
    else:
        hung = TansuKafka(log_dir=tmp_path).start()
        hung.create_topic(topic)
        assert hung.pid is not None
        os.kill(hung.pid, signal.SIGSTOP)
        bootstrap = hung.bootstrap_servers
    args = ["--count", str(count), "--then", "kill"] + (["--rate", str(rate)] if rate else [])
    app, out = _publisher(tmp_path, _env(bootstrap, topic, spool, durable=mode == "durable"), *args)
    try:
        started = time.monotonic()
        app.start()
        assert _exit_code(app, 60) == -signal.SIGKILL, app.log_tail()
        elapsed = time.monotonic() - started
    finally:
        app.kill()
        if hung is not None:
            hung.kill()  # it never answered: nothing it received can count as delivered
    published = _published(out)
    assert len(published) == count

    in_spool = _by_id(_spooled_values(spool))
    drained = _drain_with_cli(_env(tansu.bootstrap_servers, topic, spool))
    assert drained.returncode == 0, drained.stdout + drained.stderr
    in_kafka = _by_id(_topic_values(tansu.bootstrap_servers, topic))
    _check_exact(published, in_kafka)
    _check_exact(published, in_spool)
    lost = [i for i, op_id in enumerate(published) if op_id not in in_kafka]
    ops_per_s = rate if rate else count / elapsed
    figures = {
        "mode": mode,
        "kafka": kafka_state,
        "published": count,
        "ops_per_s": round(ops_per_s),
        "in_spool_after_kill": len(in_spool),
        "in_kafka_after_drain": len(in_kafka),
        "duplicates": sum(len(c) - 1 for c in in_kafka.values()),
        "lost": len(lost),
        "lost_ms_of_publishing": round(1000 * len(lost) / ops_per_s),
        "first_lost": lost[0] if lost else None,
    }
    _report("SIGKILL after publish returned", figures)
    assert STILL_IN_QUEUE not in drained.stderr
    if mode == "durable":
        assert not lost, figures
    elif kafka_state == "hung":
        # Nothing was acknowledged and nothing reached the spool: librdkafka held every op
        # until message.timeout.ms (30 s). This is the documented limit of default mode.
        assert len(lost) == count, figures
    elif kafka_state == "up":
        # Only the tail not acknowledged yet: every op published a second before the kill arrived.
        assert not lost or lost[0] >= count - rate, figures
    elif kafka_state == "refusing":
        # ALL_BROKERS_DOWN comes within a millisecond: ops went to the spool, not to memory.
        assert not lost, figures


# -- 3. a prefork worker publishes from tasks ---------------------------------------------------------


def test_prefork_worker_children_publish_5000_ops_all_arrive(
    tansu: TansuKafka, redis_server: RedisServer, tmp_path: Path
) -> None:
    """``celery worker -P prefork -c 2`` runs tasks that publish 5,000 ops; all arrive, once.

    Each child creates its own producer on its first publish (never one inherited over
    ``fork()``). The worker gets SIGTERM as soon as the last op was published, so ops
    are still in the children's librdkafka queues: the ``worker_process_shutdown`` hook
    must flush them before the children go (billiard ends a child with ``os._exit``,
    so atexit never runs there).
    """
    topic = f"durability-{uuid.uuid4().hex[:8]}"
    tansu.create_topic(topic)
    out_dir = tmp_path / "published"
    out_dir.mkdir()
    env = _env(tansu.bootstrap_servers, topic, tmp_path / "spool.sqlite3", CRR_BROKER_URL=redis_server.url,
               CRR_OUT_DIR=str(out_dir))
    worker = CeleryWorker("durability_app", queues=["durability"], concurrency=2, pool="prefork", env=env,
                          cwd=str(APPS_DIR), log_dir=tmp_path)
    client = Celery("durability-client", broker=redis_server.url)
    tasks, per_task = 100, 50
    try:
        worker.start()
        started = time.monotonic()
        for t in range(tasks):
            client.send_task("durability_app.publish_range", args=(t * per_task, per_task), queue="durability")

        def published_lines() -> int:
            return sum(_lines(path) for path in out_dir.iterdir())

        worker.wait_until(lambda: published_lines() >= tasks * per_task, 120, "5,000 ops published by tasks")
        publishing_s = time.monotonic() - started
        assert worker.stop(timeout=60) == 0, worker.log_tail()
    finally:
        client.close()
        worker.kill()

    published: dict[str, bytes] = {}
    children = 0
    for path in out_dir.iterdir():
        children += 1
        published.update(_published(path))
    assert len(published) == tasks * per_task
    in_kafka = _by_id(_topic_values(tansu.bootstrap_servers, topic))
    spool_left = _spooled_values(tmp_path / "spool.sqlite3")
    _check_exact(published, in_kafka)
    missing = set(published) - set(in_kafka)
    figures = {
        "published": len(published),
        "publishing_children": children,
        "publishing_s": round(publishing_s, 2),
        "arrived": len(in_kafka),
        "duplicates": sum(len(c) - 1 for c in in_kafka.values()),
        "missing": len(missing),
        "spool_left": len(spool_left),
    }
    _report("prefork worker", figures)
    assert children == 2, figures  # both children published: the producer was made in each
    assert not missing, figures
    assert not spool_left, figures
    assert figures["duplicates"] == 0, figures
    assert STILL_IN_QUEUE not in worker.log_text()


# -- 4. SIGTERM while publishing ----------------------------------------------------------------------

#: (mode, Kafka, application's own SIGTERM handler)
SIGTERM_CASES = [
    ("default", "up", False),
    ("default", "up", True),
    ("default", "refusing", False),
    ("durable", "up", False),
    # fsync per spooled op: the main thread is inside a spool transaction most of the time.
    ("durable", "refusing", False),
]


@pytest.mark.parametrize(("mode", "kafka_state", "own_handler"), SIGTERM_CASES,
                         ids=[f"{m}-{k}{'-app-handler' if h else ''}" for m, k, h in SIGTERM_CASES])
def test_sigterm_while_publishing_leaves_nothing_undelivered(
    tansu: TansuKafka, tmp_path: Path, mode: str, kafka_state: str, own_handler: bool
) -> None:
    """SIGTERM a process in the middle of a publishing loop: it ends promptly, nothing is lost.

    Every op ``publish`` returned must be in Kafka or in the spool, and no librdkafka
    handle may be destroyed with messages in it (librdkafka's "still in queue or
    transit" warning; the app logs librdkafka straight to stderr so it would show). The
    process must end by the signal (SIG_DFL passed on) or, with its own handler
    (``sys.exit(0)``), with exit code 0. With Kafka refusing, the main thread is inside
    spool transactions when the signal lands: the case that used to hang forever.
    """
    topic = f"durability-{uuid.uuid4().hex[:8]}"
    spool = tmp_path / "spool.sqlite3"
    if kafka_state == "up":
        tansu.create_topic(topic)
        bootstrap = tansu.bootstrap_servers
    else:
        bootstrap = f"127.0.0.1:{free_port()}"
    args = ["--then", "forever"] + (["--exit-on-sigterm"] if own_handler else [])
    app, out = _publisher(tmp_path, _env(bootstrap, topic, spool, durable=mode == "durable"), *args)
    try:
        app.start()
        app.wait_until(lambda: _lines(out) >= 1000, 60, "1,000 ops published")
        assert app.pid is not None
        os.kill(app.pid, signal.SIGTERM)
        signalled = time.monotonic()
        code = _exit_code(app, 30)
        exit_s = time.monotonic() - signalled
    finally:
        app.kill()
    assert code == (0 if own_handler else -signal.SIGTERM), app.log_tail()
    output = app.log_text()
    assert STILL_IN_QUEUE not in output

    published = _published(out)
    in_spool = _by_id(_spooled_values(spool))
    _check_exact(published, in_spool, interrupted=True)
    in_kafka: dict[str, list[bytes]] = {}
    if in_spool:
        drained = _drain_with_cli(_env(tansu.bootstrap_servers, topic, spool))
        assert drained.returncode == 0, drained.stdout + drained.stderr
    if kafka_state == "up" or in_spool:
        in_kafka = _by_id(_topic_values(tansu.bootstrap_servers, topic))
    _check_exact(published, in_kafka, interrupted=True)
    missing = set(published) - set(in_kafka)
    figures = {
        "mode": mode,
        "kafka": kafka_state,
        "app_handler": own_handler,
        "published": len(published),
        "exit_code": code,
        "exit_after_sigterm_s": round(exit_s, 2),
        "spooled_at_exit": len(in_spool),
        "in_kafka": len(in_kafka),
        "duplicates": sum(len(c) - 1 for c in in_kafka.values()),
        "missing": len(missing),
    }
    _report("SIGTERM while publishing", figures)
    assert not missing, figures
    assert exit_s < 15, figures


def test_the_still_in_queue_check_would_see_a_handle_destroyed_with_messages(tmp_path: Path) -> None:
    """The SIGTERM test's check is not vacuous: librdkafka's warning reaches the captured output."""
    code = (
        "from celery_redis_retry import kafka\n"
        f"conf = kafka.producer_config({{'bootstrap.servers': '127.0.0.1:{free_port()}'}})\n"
        "conf.pop('logger')\n"
        "p = kafka.Producer(conf)\n"
        "p.produce('t', b'x')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert STILL_IN_QUEUE in done.stderr


# -- operating the spool: celery -A proj redis-retry spool status|drain ------------------------------


def _celery(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "durability_app", "redis-retry", "spool", *args],
        cwd=str(APPS_DIR), env={**os.environ, **env}, capture_output=True, text=True, timeout=120, check=False,
    )


def test_spool_status_and_drain_commands(
    tansu: TansuKafka, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery import _state as celery_state
    from celery.bin.celery import celery as celery_group
    from click.testing import CliRunner

    from celery_redis_retry import ops
    from celery_redis_retry.capture import guard as capture
    from celery_redis_retry.message import encode, message_key

    topic = f"durability-{uuid.uuid4().hex[:8]}"
    tansu.create_topic(topic)
    path = tmp_path / "spool.sqlite3"
    built = [ops.set(f"cli:{n}", b"\x00value-%d" % n) for n in range(3)]
    spool = Spool(str(path))
    spool.put_many([(topic, message_key(op), encode(op)) for op in built], "test")
    spool.close()
    env = _env(tansu.bootstrap_servers, topic, path)

    status = _celery(env, "status")
    assert status.returncode == 0, status.stderr
    assert f"spool:     {path}" in status.stdout
    assert "messages:  3" in status.stdout
    assert "draining:  -" in status.stdout

    # Kafka unreachable: the messages stay, and the exit code and the message say so.
    closed = f"127.0.0.1:{free_port()}"
    unreachable = _celery({**env, "CRR_BOOTSTRAP": closed}, "drain", "--timeout", "1")
    assert unreachable.returncode == 4, unreachable.stdout + unreachable.stderr
    assert f"Kafka at {closed} did not answer within 1 s" in unreachable.stderr

    drained = _celery(env, "drain", "--timeout", "30")
    assert drained.returncode == 0, drained.stdout + drained.stderr
    assert "drained 3 messages, 0 left" in drained.stdout
    records = read_topic(tansu.bootstrap_servers, topic, count=3, timeout=30)
    assert sorted((r.key, r.value) for r in records) == sorted((message_key(op), encode(op)) for op in built)

    # The same command in-process, through the real `celery` click group.
    monkeypatch.syspath_prepend(str(APPS_DIR))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delitem(sys.modules, "durability_app", raising=False)
    # Importing the app makes it Celery's current app and the default producer's app:
    # put both back after the test.
    monkeypatch.setattr(celery_state._tls, "current_app", celery_state._tls.current_app)
    monkeypatch.setattr(celery_state, "default_app", celery_state.default_app)
    monkeypatch.setattr(capture, "_app", capture._app)
    monkeypatch.setattr(capture, "_producer", capture._producer)
    result = CliRunner().invoke(celery_group, ["-A", "durability_app", "redis-retry", "spool", "status"])
    sys.modules.pop("durability_app", None)
    assert result.exit_code == 0, result.output
    assert "messages:  0" in result.output
    assert f"spool:     {path}" in result.output
