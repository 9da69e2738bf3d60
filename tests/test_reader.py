"""The one read path of an op (message.Reader): decode, verify, check against the settings.

The bridge, the replay tasks and the DLQ records all read through it; each reason a
message is refused is proved here once, with the DLQ reason it ends with. The same
refusals through the real bridge and worker are in test_security.py and test_loop.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from loop_stack import LoopStack

from celery_redis_retry import kafka, message
from celery_redis_retry import ops as builders
from celery_redis_retry.config import Settings
from celery_redis_retry.dlq.record import DeadLetter
from celery_redis_retry.errors import DecodeError
from celery_redis_retry.message import Reader, Signer

SECRET = b"s" * 32
SIGNER = Signer({"k1": SECRET})


def reader(**changes: Any) -> Reader:
    conf = {
        "redis_retry_kafka": {"bootstrap.servers": "kafka:9092"},
        "redis_retry_targets": {"default": "redis://localhost:6379/0", "shards": "redis+cluster://localhost:7000"},
        "redis_retry_scripts": {"known": "return 1"},
        **{f"redis_retry_{key}": value for key, value in changes.items()},
    }
    return Reader(Settings.from_mapping(conf))


def refusal(read: Reader, raw: bytes | str) -> tuple[str, str, str]:
    """How ``read`` refuses ``raw``: (DLQ outcome, DLQ reason, error message); fails if it does not."""
    with pytest.raises(DecodeError) as info:
        read.read(raw)
    letter = DeadLetter.for_error(info.value, op=read.body(raw), raw=raw if isinstance(raw, bytes) else raw.encode())
    return letter.outcome, letter.reason, str(info.value)


def document(**changes: Any) -> bytes:
    doc = {"v": 1, "id": "op-1", "kind": "command", "created_at": 1.5, "cmds": [["SET", "k", "v"]], **changes}
    return json.dumps(doc).encode()


def test_a_valid_op_reads_back_from_bytes_and_from_text() -> None:
    op = builders.set("k", "v")
    read = reader()
    assert read.read(message.encode(op)) == op
    assert read.read(message.encode(op).decode()) == op  # Celery task arguments carry text


def test_a_signed_op_reads_back_with_the_signing_keys() -> None:
    op = builders.set("k", "v")
    assert reader(signing_keys={"k1": SECRET}).read(message.encode(op, SIGNER)) == op


@pytest.mark.parametrize(
    ("raw", "reason", "names"),
    [
        (b"not json", "malformed", "invalid message"),
        (document(kind="script"), "malformed", "a script op needs 'script'"),
        (document(v=2), "unsupported_version", "version 2 is not supported"),
        (document(cmds=[["GET", "k"]]), "forbidden_command", "GET"),
    ],
)
def test_a_message_that_is_no_valid_op_is_rejected_with_its_reason(raw: bytes, reason: str, names: str) -> None:
    outcome, got, text = refusal(reader(), raw)
    assert (outcome, got) == ("rejected", reason)
    assert names in text


def test_a_message_over_the_size_limit_is_rejected_before_parsing() -> None:
    outcome, reason, text = refusal(reader(max_message_bytes=1024), document(ctx={"pad": "x" * 2000}))
    assert (outcome, reason) == ("rejected", "malformed")
    assert "over the 1024-byte limit" in text


@pytest.mark.parametrize(
    ("raw", "names"),
    [
        (message.encode(builders.set("k", "v")), "not signed"),
        (message.encode(builders.set("k", "v"), Signer({"other": SECRET})), "unknown key id 'other'"),
        (message.encode(builders.set("k", "v"), Signer({"k1": b"t" * 32})), "bad signature"),
    ],
)
def test_an_unsigned_or_wrongly_signed_message_is_rejected(raw: bytes, names: str) -> None:
    outcome, reason, text = refusal(reader(signing_keys={"k1": SECRET}), raw)
    assert (outcome, reason) == ("rejected", "bad_signature")
    assert names in text


def test_an_op_for_a_target_not_configured_is_rejected_and_kept_in_its_record() -> None:
    raw = message.encode(builders.set("k", "v").with_target("elsewhere"))
    read = reader()
    assert refusal(read, raw)[:2] == ("rejected", "unknown_target")
    body = read.body(raw)  # the DLQ record holds the op, not its bytes
    assert body is not None
    assert body.target == "elsewhere"


def test_a_command_outside_the_allowed_commands_is_rejected() -> None:
    raw = message.encode(builders.delete("k"))
    outcome, reason, text = refusal(reader(allowed_commands=["SET"]), raw)
    assert (outcome, reason) == ("rejected", "forbidden_command")
    assert "DEL is not in redis_retry_allowed_commands" in text
    assert reader(allowed_commands=["SET", "DEL"]).read(raw).commands == (("DEL", "k"),)


def test_a_script_not_registered_is_rejected() -> None:
    outcome, reason, text = refusal(reader(), message.encode(builders.script("unknown", keys=["k"])))
    assert (outcome, reason) == ("rejected", "unknown_script")
    assert "'unknown'" in text
    assert reader().read(message.encode(builders.script("known", keys=["k"]))).script == "known"


def test_the_body_of_a_message_that_does_not_decode_is_none() -> None:
    read = reader(signing_keys={"k1": SECRET})
    assert read.body(b"not json") is None
    assert read.body(message.encode(builders.set("k", "v"))) is None  # unsigned: never trusted


def test_an_op_a_cluster_target_cannot_run_atomically_is_rejected() -> None:
    across = builders.pipeline([builders.set("a", "1"), builders.set("b", "2")]).with_target("shards")
    outcome, reason, text = refusal(reader(), message.encode(across))
    assert (outcome, reason) == ("rejected", "cross_slot")
    assert "2 Redis Cluster slots" in text
    one_slot = builders.pipeline([builders.set("{u}a", "1"), builders.set("{u}b", "2")]).with_target("shards")
    assert reader().read(message.encode(one_slot)) == one_slot


# -- through the real bridge ---------------------------------------------------------------


@pytest.mark.slow
def test_the_bridge_rejects_a_cross_slot_op_and_goes_on(make_loop: Callable[..., LoopStack]) -> None:
    # publish() refuses such an op for a cluster target: this one comes from a producer
    # configured apart (or from before the target became a cluster). It must end in the
    # DLQ, and the op behind it on the same partition must still apply.
    stack = make_loop(cluster=True)
    across = builders.pipeline([builders.set("{a}x", "1"), builders.set("{b}x", "2")])
    behind = builders.set("{a}behind", "applied")
    producer = kafka.new_producer(stack.settings().kafka)
    producer.produce(stack.topic, message.encode(across), message.message_key(behind))
    assert producer.flush(10) == 0
    stack.publish_all([behind])
    stack.start_worker(concurrency=1)
    bridge = stack.start_bridge()
    stack.wait_assigned(bridge)
    with stack.client() as r:
        stack.wait_for(lambda: r.get("{a}behind") == b"applied", 60, "the op behind the cross-slot one applied")
        assert r.get("{a}x") is None
    [letter] = stack.dead_letters(count=1)
    assert (letter.outcome, letter.reason, letter.op) == ("rejected", "cross_slot", across)
    assert bridge.running
