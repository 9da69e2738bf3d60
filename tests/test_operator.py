"""The operator commands, ``redis-retry dlq list|show|replay|purge`` and ``status``.

Real processes throughout: the ops die in a real worker, the DLQ is a real Kafka topic,
and every command runs as ``celery -A loop_app redis-retry ...`` in a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from loop_stack import LoopStack

from celery_redis_retry import kafka, ops
from celery_redis_retry.dlq_admin import Cursor, DeadLetterQueue, StoredLetter
from celery_redis_retry.kafka import MAX_METADATA, format_offsets, parse_offsets
from celery_redis_retry.testing import free_port
from celery_redis_retry.words import counted


def _stack_with_dead_ops(make_loop: Callable[..., LoopStack]) -> tuple[LoopStack, list[Any], list[Any]]:
    """A running loop whose DLQ holds 10 wrong_type SADDs, 5 invalid_value INCRBYs and one rejected poison."""
    stack = make_loop()
    with stack.client() as r:
        r.set("a-string", "x")
        r.set("not-a-number", "abc")
    stack.start_worker()
    bridge = stack.start_bridge()
    wrong_type = [ops.sadd("a-string", i) for i in range(10)]
    not_a_number = [ops.incrby("not-a-number", 1) for _ in range(5)]  # replayed through the apply-once step
    producer = kafka.new_producer(stack.settings().kafka)
    producer.produce(stack.topic, os.urandom(64), b"poison")
    assert producer.flush(10) == 0
    stack.publish_all([*wrong_type, *not_a_number])
    stack.wait_assigned(bridge)
    assert len(stack.dead_letters(count=16)) == 16
    return stack, wrong_type, not_a_number


def _refs(output: str) -> list[str]:
    return re.findall(r"^(\d+:\d+)\s", output, re.MULTILINE)


def test_dlq_list_show_replay_purge_through_the_real_cli(make_loop: Callable[..., LoopStack]) -> None:
    stack, wrong_type, not_a_number = _stack_with_dead_ops(make_loop)

    listed = stack.cli("redis-retry", "dlq", "list")
    assert listed.returncode == 0, listed.stderr
    assert len(_refs(listed.stdout)) == 16
    assert "16 pending records in " + stack.dlq_topic in listed.stdout
    assert listed.stdout.count("wrong_type") == 10
    assert listed.stdout.count("invalid_value") == 5
    assert "SADD a-string" in listed.stdout

    as_json = stack.cli("redis-retry", "dlq", "list", "--reason", "wrong_type", "--json")
    documents = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert {d["op"]["id"] for d in documents} == {op.id for op in wrong_type}
    assert all(d["outcome"] == "dead" and d["attempts"] == 1 for d in documents)

    shown = stack.cli("redis-retry", "dlq", "show", not_a_number[0].id)
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert record["op"]["id"] == not_a_number[0].id
    assert record["reason"] == "invalid_value"
    assert "not an integer" in record["error"]["message"]
    assert record["origin"]["topic"] == stack.topic
    missing = stack.cli("redis-retry", "dlq", "show", "99:99")
    assert missing.returncode == 1
    assert "no record '99:99'" in missing.stderr

    unselected = stack.cli("redis-retry", "dlq", "replay")
    assert unselected.returncode == 2
    assert "--all" in unselected.stderr
    dry = stack.cli("redis-retry", "dlq", "replay", "--outcome", "dead", "--dry-run")
    assert dry.stdout.count("would replay") == 15

    # The operator fixes the data, then replays what died of it.
    with stack.client() as r:
        r.delete("a-string")
        r.set("not-a-number", 100)
        replayed = stack.cli("redis-retry", "dlq", "replay", "--outcome", "dead")
        assert replayed.returncode == 0, replayed.stderr
        assert "15 replayed" in replayed.stdout
        assert "1 pending" in replayed.stdout
        stack.wait_for(lambda: r.scard("a-string") == 10 and r.get("not-a-number") == b"105", 60, "the replays")
        # Each INCRBY applied once, although its first life left a dedupe marker behind.
        assert r.smembers("a-string") == {str(i).encode() for i in range(10)}
        # The same records again: their replays carry the same ids, so nothing applies twice.
        again = stack.cli("redis-retry", "dlq", "replay", *(f"{op.id}" for op in not_a_number))
        assert again.returncode == 0
        assert again.stderr.count("no pending record") == 5
        refs = [d["ref"] for d in map(json.loads, stack.cli("redis-retry", "dlq", "list", "--all", "--json",
                                                             "--reason", "invalid_value").stdout.splitlines())]
        duplicates = stack.worker_log_count(r"was already applied")
        assert _replay_handled_records(stack, refs) == 5
        stack.wait_for(lambda: stack.worker_log_count(r"was already applied") == duplicates + 5, 60,
                       "the second replays to be recognised as duplicates")
        assert r.get("not-a-number") == b"105"

    left = stack.cli("redis-retry", "dlq", "list")
    assert len(_refs(left.stdout)) == 1
    assert "rejected" in left.stdout
    assert "malformed" in left.stdout
    refused = stack.cli("redis-retry", "dlq", "replay", "--all")
    assert refused.returncode == 1
    assert "was rejected (malformed)" in refused.stderr

    asked = stack.cli("redis-retry", "dlq", "purge", "--all", input="n\n")
    assert asked.returncode == 1
    assert "Aborted" in asked.stderr
    purged = stack.cli("redis-retry", "dlq", "purge", "--all", "--yes")
    assert purged.returncode == 0
    assert "1 purged, 0 pending" in purged.stdout
    empty = stack.cli("redis-retry", "dlq", "list")
    assert _refs(empty.stdout) == []
    assert "0 pending records" in empty.stdout
    everything = stack.cli("redis-retry", "dlq", "list", "--all")
    assert len(_refs(everything.stdout)) == 16
    assert everything.stdout.count("handled") == 16
    assert len(stack.dead_letters(idle=2)) == 16, "replayed ops must not have died again"


def _replay_handled_records(stack: LoopStack, refs: list[str]) -> int:
    """Replay records the cursor marks handled (as a second operator racing the first might)."""
    queue = DeadLetterQueue(stack.settings())
    records = [s for s in queue.read(include_handled=True) if s.ref in refs]
    return len(queue.replay(records).replayed)


def test_replay_of_one_record_keeps_older_pending_ones(make_loop: Callable[..., LoopStack]) -> None:
    stack, _wrong_type, _ = _stack_with_dead_ops(make_loop)
    newest_first = sorted(
        DeadLetterQueue(stack.settings()).read(), key=lambda s: (-s.offset, s.partition)
    )
    chosen = next(s for s in newest_first if s.letter is not None and s.letter.reason == "wrong_type")
    with stack.client() as r:
        r.delete("a-string")
        done = stack.cli("redis-retry", "dlq", "replay", chosen.ref)
        assert done.returncode == 0, done.stderr
        assert "1 replayed" in done.stdout
        assert "15 pending" in done.stdout
        stack.wait_for(lambda: r.scard("a-string") == 1, 60, "the one replay")
    listed = stack.cli("redis-retry", "dlq", "list")
    assert chosen.ref not in _refs(listed.stdout)
    assert len(_refs(listed.stdout)) == 15
    status = json.loads(stack.cli("redis-retry", "status", "--json").stdout)
    assert status["dlq_pending"] == 15


def test_status_reports_lag_queue_and_dlq(make_loop: Callable[..., LoopStack]) -> None:
    stack = make_loop()
    stack.publish_all([ops.set(f"k{i}", i) for i in range(40)])  # no bridge yet: all of it is lag
    first = stack.cli("redis-retry", "status", "--json")
    assert first.returncode == 0, first.stderr
    figures = json.loads(first.stdout)
    assert figures["lag"] == 40
    assert figures["dlq_pending"] == 0
    assert figures["queued_tasks"] == 0
    assert figures["spool"]["messages"] == 0
    assert not figures["errors"]

    bridge = stack.start_bridge()  # no worker: the tasks wait in the Celery queue
    stack.wait_assigned(bridge)

    def status() -> dict[str, Any]:
        return json.loads(stack.cli("redis-retry", "status", "--json").stdout)

    stack.wait_for(lambda: status()["queued_tasks"] > 0, 60, "the bridge to hand the ops to Celery")
    handed = status()
    assert (handed["lag"], handed["not_ended"]) == (40, 40)  # handed over, not ended: Kafka keeps them
    stack.start_worker()
    stack.wait_for(lambda: status()["lag"] == 0, 60, "the ops to end and the bridge to commit past them")
    text = stack.cli("redis-retry", "status")
    assert re.search(r"celery queue queue-\w+: 0 tasks waiting", text.stdout), text.stdout
    assert f"retry topic  {stack.topic}: lag 0, not ended 0" in text.stdout

    assert stack.broker is not None
    stack.broker.stop()
    down = stack.cli("redis-retry", "status")
    assert down.returncode == 4
    assert "celery_broker" in down.stderr


def test_dev_kafka_port_stays_across_restarts() -> None:
    port = free_port()
    bootstrap = {"bootstrap.servers": f"127.0.0.1:{port}"}
    argv = [sys.executable, "-m", "celery_redis_retry", "dev-kafka", "--port", str(port)]
    for _ in range(2):  # a restart finds the same bootstrap address
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as broker:
            try:
                assert broker.stdout is not None
                assert broker.stdout.readline().strip() == f"bootstrap.servers=127.0.0.1:{port}"
                topic = f"t-{uuid.uuid4().hex}"
                producer = kafka.new_producer(bootstrap)
                value = b"through the fixed port"
                assert kafka.produce_confirmed(producer, topic, [(b"k", value, None)]) == [None]
                assert [m.value() for m in kafka.read_to_end(bootstrap, topic, timeout=30)] == [value]
                busy = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
                assert busy.returncode == 1
                assert f"cannot listen on 127.0.0.1:{port}" in busy.stderr
            finally:
                broker.terminate()
            assert broker.wait(30) == 0


# -- pure logic -------------------------------------------------------------------------


def test_offsets_round_trip_as_ranges() -> None:
    assert format_offsets({12, 15, 16, 17, 3}) == "3,12,15-17"
    assert parse_offsets("3,12,15-17") == {3, 12, 15, 16, 17}
    assert parse_offsets(None) == parse_offsets("") == frozenset()
    with pytest.raises(ValueError, match="too many to remember"):
        format_offsets(range(0, 20_000, 2))
    kept = format_offsets(range(0, 20_000, 2), truncate=True)
    assert len(kept) <= MAX_METADATA
    assert kept.startswith("0,2,4,")
    assert parse_offsets(kept) <= set(range(0, 20_000, 2))
    assert parse_offsets("not,offsets") == frozenset()


def test_cursor_moves_over_handled_records_up_to_the_first_pending() -> None:
    cursor = Cursor(5, frozenset({7}))
    assert [o for o in range(3, 10) if cursor.handled(o)] == [3, 4, 7]


def _letter(partition: int, offset: int, handled: bool = False) -> StoredLetter:
    return StoredLetter(partition, offset, 0, None, handled=handled)


def test_advance_commits_a_prefix_and_remembers_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    from celery_redis_retry.config import Settings

    queue = DeadLetterQueue(Settings.from_mapping({
        "redis_retry_kafka": {"bootstrap.servers": "unused:1"}, "redis_retry_targets": {"default": "redis://x"},
    }))
    commits: list[dict[int, tuple[int, set[int]]]] = []
    monkeypatch.setattr(queue, "_commit", commits.append)
    records = [_letter(0, 5), _letter(0, 6), _letter(0, 7, handled=True), _letter(0, 8), _letter(1, 0)]
    assert queue.advance(records, [records[1], records[3]]) == 2
    assert commits == [{0: (5, {6, 7, 8})}]
    reread = [_letter(0, 5), *(_letter(0, o, handled=True) for o in (6, 7, 8)), _letter(1, 0)]
    assert queue.advance(reread, [reread[0]]) == 1  # partition 1 is untouched
    assert commits[-1] == {0: (9, set())}


def test_counts_read_in_words() -> None:
    assert counted(1, "task") == "1 task"
    assert counted(0, "task") == "0 tasks"
    assert counted(2, "pending record") == "2 pending records"
    assert counted(None, "op") == "unknown ops"
    assert counted(3, "entry", "entries") == "3 entries"
