"""The DLQ workflow against real processes: filtered, paced, crash-safe replays and the preview.

Dead letters are written the way the workers write them (``DeadLetterWriter``, to the
embedded Kafka broker); replays go through the real CLI, a real bridge and a real
``celery worker`` to a real redis-server.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable

import pytest
from loop_stack import LoopStack

import celery_redis_retry
from celery_redis_retry import ops
from celery_redis_retry.dlq.admin import DeadLetterQueue
from celery_redis_retry.dlq.record import DeadLetter, DeadLetterWriter
from celery_redis_retry.message import message_key
from celery_redis_retry.ops import RedisOp
from celery_redis_retry.testing import free_port

pytestmark = pytest.mark.slow


def _bury(stack: LoopStack, ops_by_reason: Iterable[tuple[str, RedisOp]], *, spacing: float = 0.0) -> None:
    """Write a DLQ record for each op, as a worker does when it gives an op up (``spacing`` s apart)."""
    writer = DeadLetterWriter(stack.settings())
    try:
        for reason, op in ops_by_reason:
            writer.write(DeadLetter(outcome="dead", reason=reason, op=op, attempts=4), message_key(op))
            time.sleep(spacing)
    finally:
        writer.close()


def _refs(output: str) -> list[str]:
    return re.findall(r"^(\d+:\d+)\s", output, re.MULTILINE)


def test_a_filtered_replay_at_a_rate_applies_exactly_the_chosen_records(
    make_loop: Callable[..., LoopStack],
) -> None:
    stack = make_loop()
    chosen = [ops.incrby(f"hit:{i}", i + 1) for i in range(100)]
    other_key = [ops.incrby(f"miss:{i}", 1) for i in range(20)]
    other_reason = [ops.incrby(f"hit:w{i}", 1) for i in range(20)]
    dies_again = [ops.incrby("hit:text", 1) for _ in range(5)]
    _bury(stack, [*(("retries_exhausted", op) for op in [*chosen, *other_key]),
                  *(("wrong_type", op) for op in other_reason), *(("invalid_value", op) for op in dies_again)])
    with stack.client() as r:
        r.set("hit:text", "not a number")
    stack.start_worker()
    stack.wait_assigned(stack.start_bridge())

    replay = stack.cli("redis-retry", "dlq", "replay", "--reason", "retries_exhausted", "--key", "hit:*",
                       "--rate", "50")
    assert replay.returncode == 0, replay.stderr
    took = float(re.search(r"100 replayed to \S+ in ([\d.]+) s", replay.stdout)[1])  # type: ignore[index]
    assert 1.5 <= took <= 4, f"100 records at 50/s took {took} s"
    print(f"\n100 records replayed at --rate 50 in {took:.2f} s")
    assert "45 records pending" in replay.stdout
    with stack.client() as r:
        stack.wait_for(lambda: all(r.get(f"hit:{i}") == str(i + 1).encode() for i in range(100)), 60,
                       "the 100 chosen replays")
        time.sleep(1)
        assert not r.keys("miss:*"), "records the --key filter left out were applied"
        assert not r.keys("hit:w*"), "records the --reason filter left out were applied"
    pending = stack.cli("redis-retry", "dlq", "list", "--json", "--limit", "0")
    left = [json.loads(line) for line in pending.stdout.splitlines()]
    assert sorted(d["reason"] for d in left) == ["invalid_value"] * 5 + ["retries_exhausted"] * 20 + ["wrong_type"] * 20

    # An op replayed from the DLQ that dies again comes back marked as a replay.
    originals = {d["op"]["id"]: d["ref"] for d in left if d["reason"] == "invalid_value"}
    again = stack.cli("redis-retry", "dlq", "replay", "--reason", "invalid_value", "--command", "incrby")
    assert again.returncode == 0, again.stderr
    stack.wait_for(lambda: len(stack.dead_letters(count=150, idle=1)) == 150, 60, "the replays to die again")
    replays = stack.cli("redis-retry", "dlq", "list", "--replayed", "--json")
    marked = [json.loads(line) for line in replays.stdout.splitlines()]
    assert len(marked) == 5
    for record in marked:
        first_id = record["op"]["id"].rsplit(".dlq-", 1)[0]
        assert record["replayed_from"] == originals[first_id]
    listed = stack.cli("redis-retry", "dlq", "list", "--replayed")
    assert all(originals[m["op"]["id"].rsplit(".dlq-", 1)[0]] in listed.stdout for m in marked)
    # Never replayed again by a broad selection; by an explicit one, yes.
    broad = stack.cli("redis-retry", "dlq", "replay", "--reason", "invalid_value", "--dry-run")
    assert "note: 5 selected records hold ops that died again" in broad.stderr
    assert "dry run: 0 would be replayed" in broad.stdout
    explicit = stack.cli("redis-retry", "dlq", "replay", "--reason", "invalid_value", "--replayed", "--dry-run")
    assert "dry run: 5 would be replayed" in explicit.stdout


def test_dry_run_reads_the_target_and_says_what_each_replay_would_do(make_loop: Callable[..., LoopStack]) -> None:
    stack = make_loop(extra_targets={"down": f"redis://127.0.0.1:{free_port()}/0"})
    stale = [ops.set(f"user:{i}", "old") for i in range(3)]
    fresh = [ops.set(f"user:new{i}", "v") for i in range(2)]
    guarded = ops.set("flag", "v2").if_value("v1")
    late = ops.set("user:late", "v").with_deadline(0.01)
    elsewhere = ops.set("user:far", "v").with_target("down")
    # A few ms apart: record times (ms) tell the oldest records apart for --limit.
    _bury(stack, [*(("retries_exhausted", op) for op in [*stale, *fresh, guarded, late, elsewhere])], spacing=0.005)
    time.sleep(0.05)
    wrapped = celery_redis_retry.wrap(stack.client(), producer=stack.producer)
    for op in stale:  # the app writes these keys again: stamped, as every wrapped write is
        wrapped.set(op.commands[0][1], "newer")
    with stack.client() as r:
        r.set("flag", "someone else's")
        before = {k: r.dump(k) for k in r.keys("*")}

        dry = stack.cli("redis-retry", "dlq", "replay", "--all", "--dry-run")
        assert dry.returncode == 0, dry.stderr
        lines = dict(re.findall(r"^(\d+:\d+)\s+(.*)$", dry.stdout, re.MULTILINE))
        by_op = {d["op"]["id"]: d["ref"] for d in map(json.loads, stack.cli(
            "redis-retry", "dlq", "list", "--json").stdout.splitlines())}
        def says(op: RedisOp, verdict: str) -> bool:
            return bool(lines[by_op[op.id]].startswith(verdict))

        assert all(says(op, "would be superseded: a newer write") for op in stale), dry.stdout
        assert all(says(op, "would apply: ") for op in fresh), dry.stdout
        assert says(guarded, "would be superseded: guard: flag no longer holds 'v1'"), dry.stdout
        assert says(late, "expired: deadline passed"), dry.stdout
        assert says(elsewhere, "unknown (target down: "), dry.stdout
        assert "nothing published" in dry.stdout
        assert {k: r.dump(k) for k in r.keys("*")} == before, "the preview wrote to the target"
    assert DeadLetterQueue(stack.settings()).pending_count() == 8

    # Bad filters are refused naming the value and what is allowed; the others combine.
    unknown = stack.cli("redis-retry", "dlq", "replay", "--target", "nowhere")
    assert unknown.returncode == 2
    assert "'nowhere' is no target in redis_retry_targets; the choices are: default, down" in unknown.stderr
    vague = stack.cli("redis-retry", "dlq", "list", "--older-than", "soon")
    assert vague.returncode == 2
    assert "'soon' is no duration" in vague.stderr
    typo = stack.cli("redis-retry", "dlq", "purge", "--command", "SETT", "--yes")
    assert typo.returncode == 2
    assert "'SETT' is no Redis write command" in typo.stderr
    recent = stack.cli("redis-retry", "dlq", "list", "--key", "user:*", "--newer-than", "1h", "--command", "set")
    assert len(_refs(recent.stdout)) == 7  # every op but the guarded one
    assert _refs(stack.cli("redis-retry", "dlq", "list", "--older-than", "1h").stdout) == []
    oldest = stack.cli("redis-retry", "dlq", "purge", "--key", "user:*", "--limit", "2", "--yes")
    assert "2 purged, 6 records pending" in oldest.stdout, oldest.stdout
    listed = stack.cli("redis-retry", "dlq", "list", "--json").stdout.splitlines()
    left = {json.loads(line)["op"]["id"] for line in listed}
    assert stale[0].id not in left
    assert stale[1].id not in left  # the two oldest records of user:* keys


def test_a_replay_killed_half_way_and_run_again_applies_each_record_once(
    make_loop: Callable[..., LoopStack],
) -> None:
    stack = make_loop()
    counters = [ops.incrby(f"count:{i}", 1) for i in range(60)]
    _bury(stack, (("retries_exhausted", op) for op in counters))
    stack.start_worker()
    stack.wait_assigned(stack.start_bridge())

    killed = subprocess.Popen(  # the real CLI, as an operator runs it
        [sys.executable, "-m", "celery", "-A", "loop_app", "redis-retry", "dlq", "replay", "--all", "--rate", "20"],
        env={**os.environ, **stack.env_for("operator")}, cwd=str(stack.workdir), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )
    assert killed.stderr is not None
    deadline = time.monotonic() + 60
    said: list[str] = []
    for line in killed.stderr:  # "replayed N/60, ..." once a second
        said.append(line)
        found = re.match(r"replayed (\d+)/60", line)
        # 30 records at 20/s: past the first chunk (a second), which Kafka confirmed and the replay marked.
        if (found and int(found[1]) >= 30) or time.monotonic() > deadline:
            break
    killed.send_signal(signal.SIGKILL)
    killed.wait(10)
    killed.stderr.close()
    pending = DeadLetterQueue(stack.settings()).pending_count()
    assert 0 < pending < 60, f"{pending} pending after the kill: it was not half-way; {said}"

    again = stack.cli("redis-retry", "dlq", "replay", "--all")
    assert again.returncode == 0, again.stderr
    assert "0 records pending" in again.stdout
    with stack.client() as r:
        stack.wait_for(lambda: all(r.get(f"count:{i}") is not None for i in range(60)), 60, "every replay")
        time.sleep(2)  # copies published twice have had time to be applied twice, if they could
        assert [r.get(f"count:{i}") for i in range(60)] == [b"1"] * 60
    assert _refs(stack.cli("redis-retry", "dlq", "list").stdout) == []
