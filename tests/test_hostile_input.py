"""Hostile messages produced straight onto the ops topic, against the real bridge and worker.

The corpus (``tests/chaos/hostile.py``) goes onto the topic through a plain Kafka
producer, between valid ops published by the package's own producer. The target Redis
gives the worker and the bridge a least-privilege ACL user, so whatever got through
would show in ``ACL LOG``; ``INFO commandstats``, a canary key and sentinel keys show
that nothing forbidden ran. Every hostile case must end in the DLQ exactly once with
its reason, every valid op must be applied exactly once, and the bridge must never stop.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import confluent_kafka
import orjson
import pytest
from chaos import hostile
from chaos.hostile import Case
from hypothesis import given, settings
from hypothesis import strategies as st
from loop_stack import LoopStack

from celery_redis_retry import message, ops
from celery_redis_retry.config import Settings
from celery_redis_retry.errors import DecodeError
from celery_redis_retry.message import Reader, Signer
from celery_redis_retry.redis_commands import COMMANDS

pytestmark = pytest.mark.slow

SECRET = b"hostile-input-signing-secret-0123"
SIGNER = Signer({"k1": SECRET})
USER, PASSWORD = "crr-replay", "hostile-input-password"
CANARY = "canary:before-the-run"

#: What the worker and the bridge send besides the ops' own commands: the bridge's circuit
#: probe (PING, ROLE), redis-py's handshake (CLIENT SETNAME; not CLIENT SETINFO, which Redis
#: 7.0 does not know and redis-py lets fail), the worker's Lua (EVALSHA, SCRIPT LOAD/EXISTS
#: when the script cache is empty) and the commands that Lua runs (apply_once.lua,
#: write_stamped.lua, the registered test scripts).
PLUMBING = (
    "ping", "role", "client|setname", "evalsha", "script|load", "script|exists",
    "exists", "hexists", "get", "hget", "hmget", "hlen", "time",
)

#: Commands a hostile message might have reached Redis with, as ``INFO commandstats`` names them.
FORBIDDEN_STATS = (
    "flushall", "flushdb", "config|set", "eval", "script|flush", "function|flush", "debug", "shutdown",
    "module|load", "acl|setuser", "replicaof", "slaveof", "migrate", "keys", "select",
)

#: The reasons of messages refused before any replay (the rest are ops that died).
REJECTED = {
    "malformed", "unsupported_version", "bad_signature", "forbidden_command", "unknown_target", "unknown_script",
}

ROUNDS = 5  # valid ops before, between and after the hostile chunks
REPLAYED_KEY = "hostile:replayed"


def grants() -> list[str]:
    """The ACL rules of the worker's and bridge's user: their plumbing and the replayable writes."""
    return [f"+{name}" for name in (*PLUMBING, *(c.lower() for c in COMMANDS))]


def create_least_privilege_user(client: Any) -> None:
    client.execute_command("ACL", "SETUSER", USER, "reset", "on", f">{PASSWORD}", "~*", "resetchannels", "-@all",
                           *grants())


def url_as_user(url: str) -> str:
    return url.replace("redis://", f"redis://{USER}:{PASSWORD}@", 1)


@dataclass
class Run:
    """What one run produced: each hostile message's Kafka position, and the valid ops' effects."""

    at: dict[tuple[int, int], Case] = field(default_factory=dict)
    counter: int = 0
    markers: list[str] = field(default_factory=list)


def produce_hostile(producer: Any, topic: str, cases: list[Case], run: Run) -> None:
    """Produce ``cases`` as they are and note where Kafka put each one."""
    def delivered(err: Any, msg: Any, case: Case) -> None:
        assert err is None, f"{case.name}: {err}"
        run.at[(msg.partition(), msg.offset())] = case

    for case in cases:
        producer.produce(topic, value=case.value, key=case.key,
                         on_delivery=lambda err, msg, case=case: delivered(err, msg, case))
        producer.poll(0)
    assert producer.flush(30) == 0


def publish_valid(stack: LoopStack, round_: int, run: Run) -> None:
    marker = f"m{round_}"
    stack.publish_all([ops.incrby("valid:counter", round_ + 1), ops.rpush("valid:markers", marker)])
    run.counter += round_ + 1
    run.markers.append(marker)


def run_corpus(stack: LoopStack, cases: list[Case], replay: bytes | None = None) -> tuple[Run, Any]:
    """Start the processes as the least-privilege user, then produce valid and hostile ops interleaved."""
    client = stack.client()
    create_least_privilege_user(client)
    client.set(CANARY, "alive")
    client.config_resetstat()
    client.acl_log_reset()
    stack.extra_env["CRR_TARGET_URL"] = url_as_user(stack.target.url)
    stack.start_worker()
    bridge = stack.start_bridge()
    stack.wait_assigned(bridge)
    raw_producer = confluent_kafka.Producer(
        {**stack.observer_config, "message.max.bytes": 4_000_000, "compression.type": "lz4", "linger.ms": 5}
    )
    run = Run()
    chunks = [cases[i::ROUNDS - 1] for i in range(ROUNDS - 1)]
    for round_ in range(ROUNDS):
        publish_valid(stack, round_, run)
        if round_ < len(chunks):
            produce_hostile(raw_producer, stack.topic, chunks[round_], run)
        if replay is not None and round_ in (0, 2):  # the same signed message, twice, rounds apart
            copy = Case(f"replayed_copy_{round_}", replay, None, presigned=True, effect=(REPLAYED_KEY, b"5"))
            produce_hostile(raw_producer, stack.topic, [copy], run)
    return run, bridge


def check_dead_letters(stack: LoopStack, run: Run) -> Counter[tuple[str, str]]:
    """Every hostile case in the DLQ exactly once with its reason; the table of outcomes per class."""
    expected = {at: case for at, case in run.at.items() if case.reason is not None}
    stack.dead_letters(count=len(expected), timeout=60)
    letters = stack.dead_letters(idle=2)
    seen: Counter[tuple[int, int]] = Counter()
    for letter in letters:
        assert letter.origin is not None, letter
        assert letter.origin.topic == stack.topic, letter
        position = (letter.origin.partition, letter.origin.offset)
        seen[position] += 1
        case = expected.get(position)
        assert case is not None, f"a DLQ record for no hostile case: {letter}"
        assert letter.outcome == ("rejected" if case.reason in REJECTED else "dead"), (case.name, letter)
        assert letter.reason == case.reason, (case.name, letter.reason, letter.error_message)
    missing = [case.name for at, case in expected.items() if at not in seen]
    assert not missing, f"hostile cases with no DLQ record: {missing}"
    assert [at for at, n in seen.items() if n > 1] == []
    return Counter((hostile.class_of(c), c.reason or ("applied" if c.effect else "expired")) for c in run.at.values())


def check_valid_ops_applied_once(stack: LoopStack, run: Run) -> None:
    client = stack.client()
    stack.wait_for(lambda: int(client.get("valid:counter") or 0) >= run.counter, 60, "the valid counters")
    stack.wait_for(lambda: client.llen("valid:markers") >= len(run.markers), 60, "the valid markers")
    time.sleep(1)  # a duplicate would land right after
    assert int(client.get("valid:counter")) == run.counter
    assert sorted(m.decode() for m in client.lrange("valid:markers", 0, -1)) == sorted(run.markers)


def check_applied_cases(stack: LoopStack, run: Run) -> set[bytes]:
    """Each hostile-looking case that is a valid op wrote its key once; the keys they wrote."""
    client = stack.client()
    effects = [case.effect for case in run.at.values() if case.effect is not None]
    for case in run.at.values():
        if case.reason is None and case.effect is None:
            op_id = orjson.loads(case.value or b"")["id"]
            expired = rf"op {op_id} expired"  # by the bridge, or by the worker: never both
            stack.wait_for(lambda e=expired: stack.bridge_log_count(e) + stack.worker_log_count(e) == 1, 30, case.name)
    stack.wait_for(lambda: all(client.exists(key) for key, _ in effects), 30, "the applied cases")
    assert {key: client.get(key) for key, _ in effects} == dict(effects)
    return {key.encode() for key, _ in effects}


def check_nothing_forbidden_reached_redis(stack: LoopStack, allowed_keys: set[bytes]) -> None:
    client = stack.client()
    assert client.get(CANARY) == b"alive", "the canary key is gone: something flushed the target"
    denied = [e for e in client.acl_log() if e.get("username") == USER]
    assert denied == [], f"the least-privilege user was refused: {denied}"
    stats = client.info("commandstats")
    ran = [name for name in FORBIDDEN_STATS if f"cmdstat_{name}" in stats]
    assert ran == [], f"forbidden commands ran: {ran}"
    assert set(client.scan_iter(match="hostile:*")) == allowed_keys


def check_bridge_never_restarted(stack: LoopStack, bridge: Any, pid: int | None) -> None:
    assert bridge.running, "the bridge stopped"
    assert bridge.pid == pid, "the bridge is another process"
    assert len(stack.bridges) == 1
    log = bridge.log_text()
    assert "Traceback" not in log, log[-4000:]
    assert log.count("bridge consuming") == 1, "the bridge started again"


def report(name: str, table: Counter[tuple[str, str]], seconds: float) -> None:
    lines = [f"{name}: {sum(table.values())} hostile cases in {seconds:.1f} s"]
    lines += [f"  {cls:<26} {count:>4}  {outcome}" for (cls, outcome), count in sorted(table.items(),
              key=str)]
    print("\n".join(lines))


def test_hostile_messages_unsigned_all_end_in_the_dlq_and_nothing_reaches_redis(
    make_loop: Callable[..., LoopStack],
) -> None:
    started = time.monotonic()
    stack = make_loop()
    generated = hostile.generated_cases(60, Reader(stack.settings()))
    assert len(generated) == 60
    run, bridge = run_corpus(stack, [*hostile.corpus(), *generated])
    pid = bridge.pid
    table = check_dead_letters(stack, run)
    check_valid_ops_applied_once(stack, run)
    check_nothing_forbidden_reached_redis(stack, check_applied_cases(stack, run))
    check_bridge_never_restarted(stack, bridge, pid)
    report("unsigned", table, time.monotonic() - started)


def test_hostile_messages_signed_all_end_in_the_dlq_and_a_replay_applies_once(
    make_loop: Callable[..., LoopStack],
) -> None:
    started = time.monotonic()
    stack = make_loop(extra_env={"CRR_SIGNING_KEYS": json.dumps({"k1": SECRET.decode()})})
    replayed_op = ops.incrby(REPLAYED_KEY, 5)
    run, bridge = run_corpus(stack, hostile.signed_corpus(SIGNER, SECRET), replay=message.encode(replayed_op, SIGNER))
    pid = bridge.pid
    table = check_dead_letters(stack, run)
    check_valid_ops_applied_once(stack, run)
    check_nothing_forbidden_reached_redis(stack, check_applied_cases(stack, run))
    # Produced twice, applied once (INCRBY 5 left 5): the second copy finds the dedupe marker, ends "duplicate".
    stack.wait_for(lambda: stack.worker_log_count(rf"op {replayed_op.id} was already applied") == 1, 30,
                   "the second copy ending as a duplicate")
    check_bridge_never_restarted(stack, bridge, pid)
    report("signed", table, time.monotonic() - started)


# -- the reader itself, on generated bytes ------------------------------------------------

READER = Reader(Settings.from_mapping({
    "redis_retry_kafka": {"bootstrap.servers": "127.0.0.1:1"}, "redis_retry_targets": {"default": "redis://x"},
}))
VALID = message.encode(ops.incrby("k", 1))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048) | st.builds(
    lambda at, junk: VALID[:at] + junk + VALID[at:], st.integers(0, len(VALID)), st.binary(min_size=1, max_size=8),
))
def test_the_reader_refuses_any_bytes_with_a_decode_error_or_reads_an_op(raw: bytes) -> None:
    try:
        op = READER.read(raw)
    except DecodeError as exc:
        error = str(exc)
        assert error, "a refusal names what is wrong"
    else:
        assert op.id
        assert op.commands


def test_the_corpus_names_its_reasons_from_the_dlq_list() -> None:
    from celery_redis_retry.dlq.record import REASONS

    cases = [*hostile.corpus(), *hostile.signed_corpus(SIGNER, SECRET)]
    assert {c.reason for c in cases} - {None} <= REASONS
    assert len(hostile.corpus()) >= 200
