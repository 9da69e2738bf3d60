"""An operator pauses a target: its ops wait in Kafka, through restarts, until it is resumed.

Real processes: the embedded Kafka broker, redis-server targets, a ``celery worker``
(prefork) and a ``redis-retry bridge``, driven through the real ``redis-retry target``
and ``status`` commands.
"""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from loop_stack import LoopStack

from celery_redis_retry import message, ops
from celery_redis_retry.names import REPLAY_BATCH_TASK, REPLAY_TASK
from celery_redis_retry.testing import free_port, wait_until

pytestmark = pytest.mark.slow


def _waiting(stack: LoopStack) -> int | None:
    figures = json.loads(stack.cli("redis-retry", "status", "--json").stdout)
    waiting: int | None = figures["targets"]["default"]["waiting"]
    return waiting


def _pause(stack: LoopStack, *args: str) -> str:
    done = stack.cli("redis-retry", "target", "pause", "default", *args)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _resume(stack: LoopStack) -> None:
    done = stack.cli("redis-retry", "target", "resume", "default")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "target default resumed by " in done.stdout


def _assert_none_applied_for(stack: LoopStack, keys: list[str], seconds: float) -> None:
    with stack.client() as r:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert r.mget(keys) == [None] * len(keys), "an op of a paused target was applied"
            time.sleep(0.2)


def _applied_once(stack: LoopStack, keys: list[str]) -> None:
    with stack.client() as r:
        stack.wait_for(lambda: r.mget(keys) == [b"1"] * len(keys), 30, "every op applied once after resume")
        time.sleep(1)
        assert r.mget(keys) == [b"1"] * len(keys), "an op was applied twice"


def test_ops_of_a_paused_target_wait_in_kafka_and_apply_once_after_resume(
    make_loop: Callable[..., LoopStack],
) -> None:
    stack = make_loop()
    stack.start_worker()
    bridge = stack.start_bridge()
    stack.wait_assigned(bridge)

    said = _pause(stack, "--reason", "failover drill")
    assert "target default paused by " in said
    assert ": failover drill" in said
    bridge.wait_for_log(r"target 'default' paused by \S+: failover drill: its ops wait in ", timeout=10)

    keys = [f"n:{i}" for i in range(50)]
    stack.publish_all([ops.incrby(key, 1) for key in keys])
    stack.wait_for(lambda: _waiting(stack) == 50, 30, "every op moved to the waiting topic")
    _assert_none_applied_for(stack, keys, 3)

    text = stack.cli("redis-retry", "status")
    assert text.returncode == 0, text.stderr
    assert ": failover drill, 50 ops waiting in " in text.stdout
    assert "target       default: circuit closed, paused by " in text.stdout
    pause = json.loads(stack.cli("redis-retry", "status", "--json").stdout)["targets"]["default"]["pause"]
    assert (pause["paused"], pause["reason"]) == (True, "failover drill")
    assert "@" in pause["by"]
    assert time.time() - 60 < pause["since"] <= time.time()
    listed = stack.cli("redis-retry", "target", "list")
    assert listed.stdout.startswith("default          paused by "), listed.stdout
    assert listed.stdout.rstrip().endswith(": failover drill")

    _resume(stack)
    bridge.wait_for_log(r"target 'default' resumed by \S+: its ops flow again", timeout=10)
    _applied_once(stack, keys)
    assert stack.dlq_is_empty(settle=1)
    assert stack.worker_log_count(r"retrying in") == 0
    assert json.loads(stack.cli("redis-retry", "target", "list", "--json").stdout)["default"]["paused"] is False


def test_a_pause_survives_restarts_of_the_bridge_and_the_worker(make_loop: Callable[..., LoopStack]) -> None:
    stack = make_loop()
    stack.start_worker()
    first = stack.start_bridge()
    stack.wait_assigned(first)
    _pause(stack)
    first.wait_for_log(r"target 'default' paused by ", timeout=10)

    stack.stop()  # bridge and worker: whatever they knew is gone, the pause is in Kafka
    stack.start_worker()
    second = stack.start_bridge()
    second.wait_for_log(r"target 'default' paused by ", timeout=30)  # read back before the first hand-over
    stack.wait_assigned(second)
    keys = [f"after-restart:{i}" for i in range(20)]
    stack.publish_all([ops.incrby(key, 1) for key in keys])
    stack.wait_for(lambda: _waiting(stack) == 20, 30, "every op moved to the waiting topic")
    _assert_none_applied_for(stack, keys, 2)

    _resume(stack)
    _applied_once(stack, keys)
    assert stack.dlq_is_empty(settle=1)


def test_a_task_handed_over_before_the_pause_waits_without_spending_an_attempt(
    make_loop: Callable[..., LoopStack],
) -> None:
    stack = make_loop(max_retries=0)  # a single spent attempt would make the op dead
    stack.start_worker(concurrency=1)
    bridge = stack.start_bridge()
    stack.wait_assigned(bridge)
    _pause(stack, "--reason", "in flight")
    time.sleep(1)  # the worker process follows the control topic too

    # Tasks already in the Celery queue when the pause came: sent as a bridge sends them.
    keys = ["in-flight", "in-batch:1", "in-batch:2"]
    alone, *batched = [message.encode(ops.incrby(key, 1)).decode() for key in keys]
    client = Celery("earlier-bridge", broker=stack.broker_url, set_as_current=False)
    with client.connection_for_write() as connection:
        client.send_task(REPLAY_TASK, args=(alone,), queue=f"queue-{stack.name}",
                         kwargs={"origin": {"topic": stack.topic, "partition": 0, "offset": 0}},
                         connection=connection)
        client.send_task(REPLAY_BATCH_TASK, args=(batched, [[stack.topic, 0, 1], [stack.topic, 0, 2]]),
                         queue=f"queue-{stack.name}", connection=connection)
    client.close()
    assert stack.worker is not None
    for count in (1, 2):
        stack.worker.wait_for_log(rf"{count} ops for target 'default' parked in \S+: TargetPausedError: target "
                                  r"'default' paused by \S+: in flight", timeout=30)
    stack.wait_for(lambda: _waiting(stack) == 3, 30, "the ops in the waiting topic")
    _assert_none_applied_for(stack, keys, 2)

    _resume(stack)
    _applied_once(stack, keys)
    assert stack.dlq_is_empty(settle=1), "waiting out a pause spent an attempt"


def test_status_watch_redraws_until_ctrl_c(make_loop: Callable[..., LoopStack], tmp_path: Path) -> None:
    stack = make_loop()
    _pause(stack, "--reason", "watched")
    out, err = tmp_path / "watch.out", tmp_path / "watch.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        watch = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "loop_app", "redis-retry", "status", "--watch", "--interval",
             "0.5"],
            env={**os.environ, **stack.env_for("operator")}, cwd=str(stack.workdir), stdout=stdout, stderr=stderr,
        )
        try:
            wait_until(lambda: out.read_text().count("status at ") >= 2, 30, what="two frames")
        finally:
            watch.send_signal(signal.SIGINT)
            code = watch.wait(timeout=15)
    frames = out.read_text().split("\n\n")
    assert code == 0, err.read_text()
    assert "Traceback" not in err.read_text()
    assert len(frames) >= 2
    assert all("status at " in f and ": watched, " in f for f in frames[:2]), frames[:2]


def test_status_watch_redraws_in_place_on_a_terminal(make_loop: Callable[..., LoopStack]) -> None:
    stack = make_loop()
    leader, follower = pty.openpty()
    watch = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "loop_app", "redis-retry", "status", "--watch", "--interval", "0.5"],
        env={**os.environ, **stack.env_for("operator")}, cwd=str(stack.workdir), stdout=follower,
        stderr=subprocess.PIPE,
    )
    os.close(follower)
    seen = b""
    try:
        deadline = time.monotonic() + 30
        while seen.count(b"\x1b[H\x1b[2J") < 2 and time.monotonic() < deadline:
            if select.select([leader], [], [], 0.5)[0]:
                seen += os.read(leader, 65536)
    finally:
        watch.send_signal(signal.SIGINT)
        code = watch.wait(timeout=15)
        os.close(leader)
    assert watch.stderr is not None
    with watch.stderr:
        errors = watch.stderr.read()
    assert seen.count(b"\x1b[H\x1b[2J") >= 2, seen  # each frame homes the cursor and clears the screen
    assert code == 0, errors
    assert b"Traceback" not in errors


def test_target_commands_exit_as_the_other_commands(make_loop: Callable[..., LoopStack], apache_kafka: Any) -> None:
    # Apache Kafka as production runs it: no topic is created on use.
    stack = make_loop(kafka_broker=apache_kafka, create_topics=False)
    unknown = stack.cli("redis-retry", "target", "pause", "defualt")
    assert unknown.returncode == 2, unknown.stderr
    assert "unknown target 'defualt': redis_retry_targets names default" in unknown.stderr
    missing = stack.cli("redis-retry", "target", "pause", "default")
    assert missing.returncode == 5, missing.stderr
    assert f"control topic '{stack.topic}.control' does not exist on " in missing.stderr
    assert "redis-retry topics create" in missing.stderr
    listed = stack.cli("redis-retry", "target", "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout == "default          not paused\n"
    silent = stack.cli("redis-retry", "target", "list", "--timeout", "1",
                       env={"CRR_BOOTSTRAP": f"127.0.0.1:{free_port()}"})
    assert silent.returncode == 4, silent.stderr
    assert "did not answer within 1 s" in silent.stderr
    begun = time.monotonic()
    unanswered = stack.cli("redis-retry", "target", "pause", "default", "--timeout", "1",
                           env={"CRR_BOOTSTRAP": f"127.0.0.1:{free_port()}"})
    assert unanswered.returncode == 4, unanswered.stderr
    assert "did not answer within 1 s" in unanswered.stderr
    assert time.monotonic() - begun < 8, "--timeout bounds the wait"
