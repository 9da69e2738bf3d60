"""The loop end to end, every process real: Kafka -> bridge -> Celery worker -> Redis, and the DLQ.

Each test builds its own stack (``make_loop``): a target redis-server, a Celery broker
(a second redis-server, or the session's RabbitMQ), a ``celery worker`` subprocess and a
``celery redis-retry bridge`` subprocess on the session's embedded Kafka broker.
The tests marked ``redis_and_valkey`` (the outage and the DLQ scenarios) also run with a
valkey-server as the target: the ``[valkey]`` ids.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
from click.testing import CliRunner
from loop_stack import APPS_DIR, KAFKA_EXTRA, LoopStack, data_keys

from celery_redis_retry import kafka, message, ops
from celery_redis_retry.ops import RedisOp

pytestmark = pytest.mark.slow


# -- a realistic mix with a known final state ---------------------------------------------


def mixed_ops(count: int, seed: int = 7) -> tuple[list[RedisOp], dict[str, Callable[[Any], bool]], list[str]]:
    """``count`` ops of every kind, each on its own keys so the final state is order-free.

    Returns the ops, a check per key (called with the target client), and the keys that
    must exist before the ops run (DEL and EXPIRE need something to act on).
    """
    rng = random.Random(seed)
    built: list[RedisOp] = []
    checks: dict[str, Callable[[Any], bool]] = {}
    preexisting: list[str] = []
    for i in range(count):
        kind = i % 9
        value = rng.randbytes(rng.randint(0, 64)) + b"\xff\x00"
        if kind == 0:
            key = f"set:{i}"
            built.append(ops.set(key, value, ex=3600))
            checks[key] = lambda r, k=key, v=value: r.get(k) == v and 0 < r.ttl(k) <= 3600
        elif kind == 1:
            key = f"del:{i}"
            preexisting.append(key)
            built.append(ops.delete(key))
            checks[key] = lambda r, k=key: not r.exists(k)
        elif kind == 2:
            key = f"hash:{i}"
            built.append(ops.hset(key, {"name": f"user-{i}", "blob": value, "n": i}))
            checks[key] = lambda r, k=key, v=value, n=i: r.hgetall(k) == {
                b"name": f"user-{n}".encode(), b"blob": v, b"n": str(n).encode()
            }
        elif kind == 3:
            key = f"set-members:{i}"
            built.append(ops.sadd(key, "a", value, i))
            checks[key] = lambda r, k=key, v=value, n=i: r.smembers(k) == {b"a", v, str(n).encode()}
        elif kind == 4:
            key = f"zset:{i}"
            built.append(ops.zadd(key, {"low": 1.5, value: float(i), "top": float("inf")}))
            checks[key] = lambda r, k=key, v=value, n=i: r.zrange(k, 0, -1, withscores=True) == sorted(
                [(b"low", 1.5), (v, float(n)), (b"top", float("inf"))], key=lambda p: (p[1], p[0])
            )
        elif kind == 5:
            key = f"expire:{i}"
            preexisting.append(key)
            built.append(ops.expire(key, 600))
            checks[key] = lambda r, k=key: 0 < r.ttl(k) <= 600
        elif kind == 6:
            key = f"tx:{i}"
            built.append(ops.pipeline([ops.incrby(f"{key}:n", 3), ops.rpush(f"{key}:l", "x", value)]))
            checks[key] = lambda r, k=key, v=value: r.get(f"{k}:n") == b"3" and r.lrange(f"{k}:l", 0, -1) == [b"x", v]
        elif kind == 7:
            key = f"pipe:{i}"
            built.append(
                ops.pipeline([ops.set(f"{key}:s", value), ops.hset(f"{key}:h", "f", i)], transaction=False)
            )
            checks[key] = lambda r, k=key, v=value, n=i: r.get(f"{k}:s") == v and r.hget(f"{k}:h", "f") == str(
                n
            ).encode()
        else:
            key = f"script:{i}"
            built.append(ops.script("bump", keys=[key], args=[i + 1]))
            checks[key] = lambda r, k=key, n=i: r.get(k) == str(n + 1).encode()
    return built, checks, preexisting


def failing_checks(client: Any, checks: dict[str, Callable[[Any], bool]]) -> list[str]:
    return [key for key, check in checks.items() if not check(client)]


def outage_then_recovery(stack: LoopStack, count: int) -> None:
    """Scenario 1: the target is down while ops are published, comes back ~5 s later."""
    built, checks, preexisting = mixed_ops(count)
    stack.target.start()
    with stack.client() as r:
        r.mset(dict.fromkeys(preexisting, "old"))
    stack.target.stop()  # graceful: the AOF keeps the pre-existing keys for the restart
    stack.start_worker(concurrency=2)
    bridge = stack.start_bridge()
    stack.publish_all(built)
    stack.wait_assigned(bridge)
    time.sleep(5)
    stack.target.restart()
    with stack.client() as r:
        stack.wait_for(lambda: not failing_checks(r, checks), 180, f"all {count} ops applied")
        assert failing_checks(r, checks) == []
    assert stack.dlq_is_empty()
    assert stack.outage_seen(), "the outage should have opened the circuit"
    assert stack.worker_log_count(r"retrying in") == 0, "an outage spends no attempt of the op"


@pytest.mark.redis_and_valkey
def test_outage_then_recovery_applies_every_op(make_loop: Callable[..., LoopStack]) -> None:
    stack = make_loop(target_running=False, max_retries=12, backoff=0.5, backoff_max=4.0)
    outage_then_recovery(stack, 2000)


def test_outage_then_recovery_with_rabbitmq_as_celery_broker(
    make_loop: Callable[..., LoopStack], rabbitmq_url: str
) -> None:
    stack = make_loop(broker_url=rabbitmq_url, target_running=False, max_retries=12, backoff=0.5, backoff_max=4.0)
    try:
        outage_then_recovery(stack, 2000)
    finally:
        _delete_rabbitmq_queue(rabbitmq_url, f"queue-{stack.name}")


def _delete_rabbitmq_queue(url: str, name: str) -> None:
    from kombu import Connection

    with Connection(url) as connection:
        connection.default_channel.queue_delete(name)


# -- ops that can never succeed, and poison -------------------------------------------------


@pytest.mark.redis_and_valkey
def test_permanent_failures_and_poison_go_to_the_dlq(make_loop: Callable[..., LoopStack]) -> None:
    permanent_failures_and_poison(make_loop())


def permanent_failures_and_poison(stack: LoopStack) -> None:
    """Scenario 2: wrong-type ops, unregistered scripts and a poison record, each dead-lettered once."""
    with stack.client() as r:
        r.set("a-string", "x")
    stack.start_worker()
    bridge = stack.start_bridge()

    wrong_type = [ops.lpush("a-string", f"v{i}") if i % 2 else ops.sadd("a-string", i) for i in range(30)]
    unknown_script = [ops.script("never-registered", keys=[f"k{i}"], args=[i]) for i in range(20)]
    # Poison first, then real ops on the same message key: same partition, behind it.
    poison = os.urandom(200)
    same_key_ops = [ops.rpush("after-poison", i) for i in range(10)]
    producer = kafka.new_producer(stack.settings().kafka)
    producer.produce(stack.topic, poison, message.message_key(same_key_ops[0]))
    # publish() refuses unregistered scripts: these come from a producer configured apart.
    for op in unknown_script:
        producer.produce(stack.topic, message.encode(op), message.message_key(op))
    assert producer.flush(10) == 0
    stack.publish_all([*wrong_type, *same_key_ops])
    stack.wait_assigned(bridge)

    with stack.client() as r:
        stack.wait_for(lambda: r.llen("after-poison") == 10, 60, "the ops behind the poison applied")
        assert sorted(int(x) for x in r.lrange("after-poison", 0, -1)) == list(range(10))
    letters = stack.dead_letters(count=51)
    assert len(letters) == 51
    poisoned = [d for d in letters if d.reason == "malformed"]
    by_id = {d.op_id: d for d in letters if d.op_id is not None}
    assert len(poisoned) == 1
    assert poisoned[0].outcome == "rejected"
    assert poisoned[0].raw == poison
    assert poisoned[0].origin is not None
    assert poisoned[0].origin.topic == stack.topic
    assert len(by_id) == 50
    for op in wrong_type:
        assert by_id[op.id].outcome == "dead"
        assert by_id[op.id].reason == "wrong_type"
        assert by_id[op.id].op == op
        assert by_id[op.id].attempts == 1
    for op in unknown_script:
        # Never valid here: the bridge refuses it before it reaches a worker.
        assert by_id[op.id].outcome == "rejected"
        assert by_id[op.id].reason == "unknown_script"
        assert by_id[op.id].op == op
    def in_order(found: list[Any]) -> list[Any]:  # read_topic orders records only within a partition
        return sorted(found, key=lambda d: (d.origin.partition, d.origin.offset))

    assert in_order(stack.dead_letters(idle=3)) == in_order(letters), "exactly one record per dead op, nothing more"


def test_ops_are_dead_after_their_last_retry(make_loop: Callable[..., LoopStack]) -> None:
    # A target that refuses every write with OOM (noeviction, no memory to spare): a failure of
    # what the op asks, not an outage (PING and ROLE answer), so each one spends an attempt.
    stack = make_loop(target_args=("--maxmemory", "1", "--maxmemory-policy", "noeviction"), max_retries=2,
                      backoff=0.2, backoff_max=1.0)
    stack.start_worker()
    bridge = stack.start_bridge()
    built = [ops.set(f"k{i}", i) if i % 2 else ops.incrby(f"n{i}", i) for i in range(20)]
    stack.publish_all(built)
    stack.wait_assigned(bridge)
    letters = stack.dead_letters(count=20, timeout=90)
    assert {d.op_id for d in letters} == {op.id for op in built}
    for letter in letters:
        assert letter.outcome == "dead"
        assert letter.reason == "retries_exhausted"
        assert letter.attempts == 3  # max_retries + 1
        assert letter.error_type == "celery_redis_retry.errors.RetriesExhaustedError"
        assert "OutOfMemoryError" in letter.error_message
        assert letter.task_id
    records = stack.dead_letters(idle=3)
    assert len(records) == 20
    headers = _dlq_headers(stack)
    assert all(h["crr-reason"] == b"retries_exhausted" and h["crr-attempts"] == b"3" for h in headers)


def _dlq_headers(stack: LoopStack) -> list[dict[str, bytes]]:
    from celery_redis_retry.testing import read_topic

    return [r.headers for r in read_topic(stack.kafka.bootstrap_servers, stack.dlq_topic, idle=2)]


# -- the bridge killed mid-stream ----------------------------------------------------------


def test_bridge_killed_mid_stream_loses_nothing(make_loop: Callable[..., LoopStack]) -> None:
    # No worker yet and a low high-water mark: the bridge hands over a few batches, stops reading
    # (backpressure) and is killed while it holds consumed ops it has not handed over. Timing cannot
    # make the kill come "too late": the restarted bridge must find every op past what was handed over.
    stack = make_loop()
    bridge = stack.start_bridge("--batch-size", "50", env={"CRR_HIGH_WATER": "10"})
    count = 3000
    built = [ops.rpush(f"list:{i}", i) for i in range(count)]
    stack.publish_all(built)
    stack.wait_assigned(bridge)
    bridge.wait_for_log(r"reading paused", timeout=60)
    bridge.kill()
    committed_at_kill = sum(max(offset, 0) for offset in stack.committed_offsets().values())
    assert committed_at_kill < count, "the bridge committed offsets of ops it never handed over"
    stack.start_worker(concurrency=2)
    restarted = stack.start_bridge("--batch-size", "50")
    stack.wait_assigned(restarted)
    with stack.client() as r:
        stack.wait_for(lambda: _applied(r, count) == count, 180, "every op applied after the restart")
        lists = [r.lrange(f"list:{i}", 0, -1) for i in range(count)]
    assert lists == [[str(i).encode()] for i in range(count)], "each op applied exactly once"
    stack.wait_for(lambda: _duplicates_settled(stack), 30, "the worker to go idle")
    duplicates = stack.worker_log_count(r"was already applied")
    print(f"\nbridge killed with {committed_at_kill}/{count} offsets committed; duplicates caught: {duplicates}")
    assert stack.dlq_is_empty()


def _applied(r: Any, count: int) -> int:
    with r.pipeline(transaction=False) as pipe:
        for i in range(count):
            pipe.exists(f"list:{i}")
        return sum(pipe.execute())


def _duplicates_settled(stack: LoopStack) -> bool:
    assert stack.worker is not None
    before = stack.worker.log_text()
    time.sleep(1.0)
    return stack.worker.log_text() == before


# -- the command line ----------------------------------------------------------------------

SUBCOMMANDS = ("bridge", "dlq", "spool", "status")


def test_redis_retry_help_through_clirunner(monkeypatch: pytest.MonkeyPatch) -> None:
    from celery.bin.celery import celery as celery_group

    monkeypatch.syspath_prepend(str(APPS_DIR))
    for key, value in _dummy_env().items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(celery_group, ["-A", "loop_app", "redis-retry", "--help"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for name in SUBCOMMANDS:
        assert re.search(rf"^\s+{name}\s", result.output, re.MULTILINE), result.output


def _celery(*args: str, cwd: Any = None, **env: str) -> subprocess.CompletedProcess[str]:
    """``celery -A loop_app ARGS`` as a real subprocess, with the dummy settings overridden by ``env``."""
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "loop_app", *args],
        env={**os.environ, **_dummy_env(), "PYTHONPATH": str(APPS_DIR), **env},
        capture_output=True, text=True, timeout=90, check=False, cwd=cwd,
    )


def test_redis_retry_help_as_a_real_subprocess() -> None:
    done = _celery("redis-retry", "--help")
    assert done.returncode == 0, done.stderr
    for name in SUBCOMMANDS:
        assert re.search(rf"^\s+{name}\s", done.stdout, re.MULTILINE), done.stdout


def test_bridge_exits_4_when_kafka_is_unreachable(redis_server: Any, tmp_path: Any) -> None:
    done = _celery("redis-retry", "bridge", cwd=tmp_path, CRR_BROKER_URL=redis_server.url)
    assert done.returncode == 4, done.stderr
    assert "cannot reach Kafka" in done.stderr


def test_bridge_exits_4_when_the_celery_broker_is_unreachable(kafka: Any, tmp_path: Any) -> None:
    done = _celery("redis-retry", "bridge", cwd=tmp_path, CRR_BOOTSTRAP=kafka.bootstrap_servers)
    assert done.returncode == 4, done.stderr
    assert "cannot reach the Celery broker" in done.stderr


def test_bridge_exits_3_on_bad_settings(redis_server: Any, tmp_path: Any) -> None:
    done = _celery(
        "redis-retry", "bridge", cwd=tmp_path, CRR_BROKER_URL=redis_server.url, CRR_TARGET_URL="http://not-redis"
    )
    assert done.returncode == 3, done.stderr
    assert "redis_retry_targets['default']" in done.stderr


def _dummy_env() -> dict[str, str]:
    # Nothing listens on port 1: commands that connect fail fast and clearly.
    return {
        "CRR_BROKER_URL": "redis://127.0.0.1:1/0",
        "CRR_BOOTSTRAP": "127.0.0.1:1",
        "CRR_TARGET_URL": "redis://127.0.0.1:1/0",
    }


# -- hand-over failures stall a partition, never skip it -----------------------------------


def test_a_failing_dlq_write_stalls_the_partition_until_it_succeeds(make_loop: Callable[..., LoopStack]) -> None:
    stack = make_loop()
    stack.start_worker()
    # librdkafka refuses records above message.max.bytes: the poison's DLQ record cannot be written.
    small = {"CRR_KAFKA_EXTRA": json.dumps({**KAFKA_EXTRA, "message.max.bytes": 3000})}
    bridge = stack.start_bridge(env=small)
    poison = os.urandom(2500)  # fits in Kafka; its DLQ record (base64 + metadata) does not fit
    behind = [ops.rpush("behind", i) for i in range(5)]
    producer = kafka.new_producer(stack.settings().kafka)
    producer.produce(stack.topic, poison, message.message_key(behind[0]))
    assert producer.flush(10) == 0
    stack.publish_all(behind)
    stack.wait_assigned(bridge)
    bridge.wait_for_log(r"not handed over", timeout=60)
    time.sleep(3)
    with stack.client() as r:
        assert r.llen("behind") == 0, "ops behind an op that was not handed over must wait"
    poison_partition = next(p for p, end in stack.end_offsets().items() if end > 0)
    assert stack.committed_offsets()[poison_partition] <= 0, "never commit past the stalled op"

    bridge.stop(timeout=30)
    fixed = stack.start_bridge()
    stack.wait_assigned(fixed)
    with stack.client() as r:
        stack.wait_for(lambda: r.llen("behind") == 5, 60, "the ops behind the poison applied")
    letters = stack.dead_letters(count=1)
    assert letters[0].outcome == "rejected"
    assert letters[0].raw == poison


def test_celery_broker_outage_stalls_then_resumes(make_loop: Callable[..., LoopStack]) -> None:
    stack = make_loop(extra_env={"CRR_VISIBILITY_TIMEOUT": "10"})
    assert stack.broker is not None
    stack.start_worker()
    bridge = stack.start_bridge()
    first = [ops.incrby(f"n:{i}", 1) for i in range(300)]
    stack.publish_all(first)
    stack.wait_assigned(bridge)
    with stack.client() as r:
        stack.wait_for(lambda: _counted(r, 300) >= 100, 60, "some ops applied")
        stack.broker.stop()  # graceful: its append-only file keeps the queued tasks
        second = [ops.incrby(f"n:{i}", 1) for i in range(300, 600)]
        stack.publish_all(second)
        bridge.wait_for_log(r"not handed over", timeout=60)
        time.sleep(2)
        stack.broker.restart()
        assert stack.worker is not None
        if not stack.worker.running:
            # kombu 5.7's Redis transport can crash the worker when its broker goes away
            # ("Unrecoverable error: AttributeError ... 'hostname'" in restore_unacked, see
            # celery/kombu#970 and celery/celery#10205); a supervisor restarts it, so do we.
            # The tasks it held come back after the broker's visibility timeout.
            stack.start_worker()
        stack.wait_for(lambda: _counted(r, 600) == 600, 120, "all 600 ops applied after the broker came back")
        assert all(v == b"1" for v in r.mget([f"n:{i}" for i in range(600)]))
    assert stack.dlq_is_empty()


def _counted(r: Any, count: int) -> int:
    """How many of the counters n:0..n:count-1 exist (dedupe markers live beside them)."""
    return sum(v is not None for v in r.mget([f"n:{i}" for i in range(count)]))


def test_sigterm_stops_the_bridge_gracefully_with_offsets_committed(make_loop: Callable[..., LoopStack]) -> None:
    stack = make_loop()
    stack.start_worker()
    bridge = stack.start_bridge()
    stack.publish_all(ops.set(f"k:{i}", i) for i in range(200))
    stack.wait_assigned(bridge)
    with stack.client() as r:
        stack.wait_for(lambda: data_keys(r) == 200, 60, "all ops applied")
    assert bridge.stop(timeout=30) == 0
    assert "bridge stopping" in bridge.log_text()
    assert stack.committed_offsets() == stack.end_offsets()


# -- start-up and installation -------------------------------------------------------------


def test_a_worker_with_bad_settings_refuses_to_start(make_loop: Callable[..., LoopStack]) -> None:
    from celery_redis_retry.testing import ProcessExitedError

    stack = make_loop(extra_env={"CRR_TARGET_URL": "http://not-redis:1"})
    with pytest.raises(ProcessExitedError) as failure:
        stack.start_worker()
    assert "redis_retry_targets['default'] must be a Redis URL" in str(failure.value)


def test_install_keeps_the_apps_own_queues_and_routes() -> None:
    from celery import Celery
    from kombu import Queue

    import celery_redis_retry
    from celery_redis_retry.names import DEAD_LETTER_TASK, REPLAY_TASK

    app = Celery("installed", broker="memory://", set_as_current=False)
    routes = {"billing.*": {"queue": "billing"}}
    app.conf.update(
        task_queues=[Queue("billing"), Queue("emails")],
        task_routes=routes,
        redis_retry_kafka={"bootstrap.servers": "127.0.0.1:1"},
        redis_retry_targets={"default": "redis://127.0.0.1:1/0"},
        redis_retry_queue="replays",
    )
    celery_redis_retry.install(app)
    assert [q.name for q in app.conf.task_queues] == ["billing", "emails", "replays", "replays.critical"]
    assert app.conf.task_routes == routes
    assert REPLAY_TASK in app.tasks
    assert DEAD_LETTER_TASK in app.tasks


@pytest.mark.parametrize(("own", "expected"), [(None, 1000), (50, 50)])
def test_install_bounds_the_countdown_tasks_a_worker_holds(own: int | None, expected: int) -> None:
    from celery import Celery

    import celery_redis_retry

    app = Celery("bounded", broker="memory://", set_as_current=False)
    app.conf.update(
        redis_retry_kafka={"bootstrap.servers": "127.0.0.1:1"},
        redis_retry_targets={"default": "redis://127.0.0.1:1/0"},
        worker_eta_task_limit=own,
    )
    celery_redis_retry.install(app)
    assert app.conf.worker_eta_task_limit == expected  # redis_retry_max_countdown_tasks, unless the app says


def test_celery_retry_semantics_this_design_relies_on() -> None:
    """What Celery really does, and why replay checks its own limit and dead_letter is not bound.

    When ``self.retry(exc=...)`` runs out, Celery raises the original exception, not
    MaxRetriesExceededError (so the exception alone cannot say "retries exhausted"); and
    a ``bind=True`` error callback is called the old way, with only the task id.
    """
    from celery import Celery

    from celery_redis_retry.tasks import dead_letter

    app = Celery("semantics", broker="memory://", set_as_current=False)
    app.conf.task_always_eager = True

    @app.task(bind=True, max_retries=1)
    def flaky(self: Any) -> None:
        raise self.retry(exc=KeyError("original"), countdown=0)

    with pytest.raises(KeyError):  # the last attempt: retries already at max_retries
        flaky.apply(retries=1, throw=True)

    @app.task(bind=True)
    def bound_errback(self: Any, *args: Any) -> None: ...

    @app.task
    def plain_errback(request: Any, exc: Any, traceback: Any) -> None: ...

    # Celery calls an errback the new way, errback(request, exc, traceback), only when its
    # header is not a functools.partial (what bind=True makes) and takes more than one
    # argument (celery/backends/base.py, _call_task_errbacks).
    assert isinstance(bound_errback.__header__, functools.partial)
    assert not isinstance(plain_errback.__header__, functools.partial)
    assert app.backend._errback_arity_greater(plain_errback.s(), 1)
    ours = app.tasks[dead_letter.name]
    assert not isinstance(ours.__header__, functools.partial)
    assert app.backend._errback_arity_greater(ours.s(), 1)
