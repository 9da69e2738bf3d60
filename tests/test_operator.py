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
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from loop_stack import LoopStack

from celery_redis_retry import errors, kafka, ops, policy
from celery_redis_retry.capture.spool import Spool
from celery_redis_retry.cli import main, redis_retry
from celery_redis_retry.dlq import record as dlq
from celery_redis_retry.dlq.admin import Cursor, DeadLetterQueue, StoredLetter
from celery_redis_retry.kafka import MAX_METADATA, format_offsets, parse_offsets
from celery_redis_retry.kafka import topics as topics_module
from celery_redis_retry.kafka.topics import DAY_MS
from celery_redis_retry.replay import executor as redis_exec
from celery_redis_retry.testing import CeleryCommand, free_port
from celery_redis_retry.words import counted

pytestmark = pytest.mark.slow


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

    typo = stack.cli("redis-retry", "dlq", "list", "--reason", "wrong_typo")
    assert typo.returncode == 2, typo.stderr
    assert "'wrong_typo' is no DLQ reason" in typo.stderr
    assert "wrong_type" in typo.stderr
    assert "retries_exhausted" in typo.stderr
    assert typo.stdout == ""

    shown = stack.cli("redis-retry", "dlq", "show", not_a_number[0].id)
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert record["op"]["id"] == not_a_number[0].id
    assert record["state"] == "pending"
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
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count("would apply:") == 15
    assert "dry run: 15 would be replayed" in dry.stdout
    dry_rejected = stack.cli("redis-retry", "dlq", "replay", "--outcome", "rejected", "--dry-run")
    assert dry_rejected.returncode == 1  # the real replay would refuse it, and exit 1
    assert "refused: " in dry_rejected.stdout
    assert "was rejected (malformed)" in dry_rejected.stdout
    assert "dry run: 0 would be replayed" in dry_rejected.stdout
    for command in ("replay", "purge"):
        nowhere = stack.cli("redis-retry", "dlq", command, "1:99", "--yes" if command == "purge" else "--dry-run")
        assert nowhere.returncode == 1, (command, nowhere.stdout, nowhere.stderr)
        assert "no pending record '1:99'" in nowhere.stderr
        assert "matches" in nowhere.stdout
    assert stack.cli("redis-retry", "dlq", "replay", "1:99").returncode == 1

    # The operator fixes the data, then replays what died of it.
    with stack.client() as r:
        r.delete("a-string")
        r.set("not-a-number", 100)
        replayed = stack.cli("redis-retry", "dlq", "replay", "--outcome", "dead")
        assert replayed.returncode == 0, replayed.stderr
        assert "15 replayed" in replayed.stdout
        assert "1 record pending" in replayed.stdout
        stack.wait_for(lambda: r.scard("a-string") == 10 and r.get("not-a-number") == b"105", 60, "the replays")
        # Each INCRBY applied once, although its first life left a dedupe marker behind.
        assert r.smembers("a-string") == {str(i).encode() for i in range(10)}
        # The same records again: their replays carry the same ids, so nothing applies twice.
        again = stack.cli("redis-retry", "dlq", "replay", *(f"{op.id}" for op in not_a_number))
        assert again.returncode == 1  # handled records are no pending records
        assert again.stderr.count("no pending record") == 5
        handled = json.loads(stack.cli("redis-retry", "dlq", "show", not_a_number[0].id).stdout)
        assert handled["state"] == "handled"
        refs = [d["ref"] for d in map(json.loads, stack.cli("redis-retry", "dlq", "list", "--include-handled", "--json",
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

    assert "1 pending record in" in left.stdout

    asked = stack.cli("redis-retry", "dlq", "purge", "--all", input="n\n")
    assert asked.returncode == 1
    assert "purge 1 record of" in asked.stdout
    assert "Aborted" in asked.stderr
    purged = stack.cli("redis-retry", "dlq", "purge", "--all", "--yes")
    assert purged.returncode == 0
    assert "1 purged, 0 records pending" in purged.stdout
    empty = stack.cli("redis-retry", "dlq", "list")
    assert _refs(empty.stdout) == []
    assert "0 pending records" in empty.stdout
    nothing = stack.cli("redis-retry", "dlq", "replay", "--all", "--dry-run")
    assert nothing.returncode == 0, nothing.stderr
    assert f"no pending record in {stack.dlq_topic} matches" in nothing.stdout
    assert "dry run: 0 would be replayed" in nothing.stdout
    everything = stack.cli("redis-retry", "dlq", "list", "--include-handled")
    assert len(_refs(everything.stdout)) == 16
    assert everything.stdout.count("handled") == 16
    # The flag's first name still works, and says what it is called now.
    by_old_name = stack.cli("redis-retry", "dlq", "list", "--all")
    assert by_old_name.returncode == 0, by_old_name.stderr
    assert by_old_name.stdout == everything.stdout
    assert by_old_name.stderr.strip() == "note: dlq list --all is now --include-handled"
    assert "--all" not in stack.cli("redis-retry", "dlq", "list", "--help").stdout
    assert len(stack.dead_letters(idle=2)) == 16, "replayed ops must not have died again"


def _replay_handled_records(stack: LoopStack, refs: list[str]) -> int:
    """Replay records the cursor marks handled (as a second operator racing the first might)."""
    queue = DeadLetterQueue(stack.settings())
    records = [s for s in queue.read(include_handled=True) if s.ref in refs]
    return len(queue.republish(records).republished)


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
        assert "15 records pending" in done.stdout
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
    # No bridge committed yet: no committed offset, said so (not librdkafka's -1001).
    assert {p["committed"] for p in figures["partitions"].values()} == {None}
    fresh = stack.cli("redis-retry", "status")
    assert fresh.returncode == 0, fresh.stderr
    assert "-1001" not in fresh.stdout
    assert re.search(r"partition \d+: end \d+, committed -, lag", fresh.stdout), fresh.stdout
    assert "spool        0 messages in" in fresh.stdout
    assert "0 records pending" in fresh.stdout

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


# -- what every command says, and its exit codes ----------------------------------------

#: Seconds a `celery -A loop_app ...` subprocess may take on top of its --timeout: starting
#: Python, Celery and the app on a loaded two-core machine.
STARTUP_MARGIN = 6.0

#: Every command that talks to Kafka, as run against a closed port.
KAFKA_COMMANDS = [
    ("dlq", "list"), ("dlq", "show", "0:0"), ("dlq", "replay", "--all"), ("dlq", "purge", "--all", "--yes"),
    ("status",), ("spool", "drain"), ("topics", "create"), ("topics", "describe"),
]


def test_every_kafka_command_gives_up_within_its_timeout(make_loop: Callable[..., LoopStack]) -> None:
    stack = make_loop(create_topics=False)
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there
    Spool(str(stack.workdir / "spool.sqlite3")).put(stack.topic, b"k", b"an op Kafka could not take")
    for command in KAFKA_COMMANDS:
        started = time.monotonic()
        done = stack.cli("redis-retry", *command, "--timeout", "1", env={"CRR_BOOTSTRAP": closed})
        elapsed = time.monotonic() - started
        assert done.returncode == 4, (command, done.stdout, done.stderr)
        assert f"Kafka at {closed} did not answer within 1 s" in done.stderr, (command, done.stderr)
        assert elapsed < 1 + STARTUP_MARGIN, (command, elapsed)


def test_without_an_app_the_cli_asks_for_one(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("CELERY_APP", "APP")}
    done = subprocess.run([sys.executable, "-m", "celery", "redis-retry", "dlq", "list"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert "-A/--app" in done.stderr
    assert "celery -A proj redis-retry" in done.stderr
    assert "redis_retry_kafka" not in done.stderr


def _leaf_commands(group: click.Group, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    leaves: list[tuple[str, ...]] = []
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            leaves += [(*path, name), *_leaf_commands(command, (*path, name))]
        else:
            leaves.append((*path, name))
    return leaves


def test_help_is_plain_text_and_every_command_states_its_exit_codes() -> None:
    runner = CliRunner()
    for root in (redis_retry, main):
        for path in [(), *_leaf_commands(root)]:
            shown = runner.invoke(root, [*path, "--help"])
            assert shown.exit_code == 0, (path, shown.output)
            assert "``" not in shown.output, (path, shown.output)
            command = root
            for name in path:
                assert isinstance(command, click.Group)
                command = command.commands[name]
            if not isinstance(command, click.Group):
                assert "Exits 0" in " ".join(shown.output.split()), (path, shown.output)


def test_bridge_writes_its_pidfile_and_logs_to_its_logfile(make_loop: Callable[..., LoopStack]) -> None:
    stack = make_loop()
    pidfile, logfile = stack.workdir / "bridge.pid", stack.workdir / "bridge.log"
    gone = subprocess.Popen(["true"])
    gone.wait()
    pidfile.write_text(f"{gone.pid}\n")  # stale: its process has ended, the bridge replaces it
    bridge = CeleryCommand(
        "loop_app", ["redis-retry", "bridge", "--pidfile", str(pidfile), "--logfile", str(logfile)],
        env=stack.env_for("bridge"), cwd=str(stack.workdir), log_dir=stack.workdir,
    )
    stack.bridges.append(bridge)  # stopped with the stack if the test fails
    bridge.start()
    bridge.wait_until(lambda: logfile.exists() and "bridge consuming" in logfile.read_text(), 90,
                      "the bridge to log to its logfile")
    assert pidfile.read_text().strip() == str(bridge.pid)

    second = stack.cli("redis-retry", "bridge", "--pidfile", str(pidfile))
    assert second.returncode == 1, second.stderr
    assert f"names process {bridge.pid}, which is running" in second.stderr
    assert pidfile.read_text().strip() == str(bridge.pid)

    assert bridge.stop(timeout=30) == 0
    assert not pidfile.exists()
    logged = logfile.read_text()
    assert "reading paused 0 times (Celery queue at high water)" in logged
    assert "0 ops dispatched in 0 tasks" in logged
    assert "bridge consuming" not in bridge.log_text()  # stderr: nothing logged there


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


def test_counts_read_in_words() -> None:
    assert counted(1, "task") == "1 task"
    assert counted(0, "task") == "0 tasks"
    assert counted(2, "pending record") == "2 pending records"
    assert counted(None, "op") == "unknown ops"
    assert counted(3, "entry", "entries") == "3 entries"
    assert counted(1.0, "day") == "1 day"
    assert counted(11 + 1 / 3, "day") == "11.3333 days"
    assert topics_module._days(str(DAY_MS)) == " (1 day)"


def test_every_reason_a_dead_letter_can_carry_is_a_known_reason() -> None:
    raised_to_the_app = {"error", "captured", "publish_failed", "spool_full"}
    raised_by_commands_and_the_bridge = {"topic_missing", "topic_setup", "unavailable", "handover_failed", "harness"}
    never_dead_letters = raised_to_the_app | raised_by_commands_and_the_bridge  # never written to the DLQ
    error_reasons = {getattr(errors, name).reason for name in errors.__all__} - never_dead_letters
    assert error_reasons <= dlq.REASONS, error_reasons - dlq.REASONS
    redis_errors = ["WRONGTYPE Operation against a key", "CROSSSLOT Keys", "ERR unknown command 'X'",
                    "EXECABORT Transaction discarded", "ERR wrong number of arguments", "ERR syntax error",
                    "ERR value is not an integer or out of range", "ERR something else"]
    assert {policy.permanent_reason(text) for text in redis_errors} <= dlq.REASONS
    source = Path(redis_exec.__file__).read_text()
    assert set(re.findall(r'reason="(\w+)"', source)) <= dlq.REASONS
    time_limit = type("TimeLimitExceeded", (Exception,), {})
    assert {dlq._describe(exc)[1] for exc in (time_limit(), ValueError())} <= dlq.REASONS
