"""The op model: what each builder builds, absolute expiries, validation, immutability, ids, keys."""

from __future__ import annotations

import math
import os
import types
from typing import Any

import msgspec
import pytest
import redis.exceptions as rex
from hypothesis import HealthCheck, given, settings
from strategies import ops as any_ops

from celery_redis_retry import ops
from celery_redis_retry import redis_commands as commands
from celery_redis_retry.errors import CommandNotAllowedError, EncodeError
from celery_redis_retry.ops import RedisOp

NOW = 1_700_000_000.25
NOW_MS = 1_700_000_000_250


@pytest.fixture(autouse=True)
def frozen_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Capture time is ``NOW`` in every test here, so absolute expiries are exact."""
    monkeypatch.setattr(ops, "time", types.SimpleNamespace(time=lambda: NOW))


def only(op: RedisOp) -> tuple[Any, ...]:
    """The one command of a ``command`` op."""
    assert op.kind == "command"
    (command,) = op.commands
    return command


# -- builders build the exact command ----------------------------------------------------


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda: ops.set("k", "v"), ("SET", "k", "v")),
        (lambda: ops.set("k", "v", ex=10), ("SET", "k", "v", "PXAT", NOW_MS + 10_000)),
        (lambda: ops.set("k", "v", px=1500), ("SET", "k", "v", "PXAT", NOW_MS + 1500)),
        (lambda: ops.set("k", "v", exat=1_800_000_000), ("SET", "k", "v", "PXAT", 1_800_000_000_000)),
        (lambda: ops.set("k", "v", pxat=1_800_000_000_123), ("SET", "k", "v", "PXAT", 1_800_000_000_123)),
        (lambda: ops.set("k", "v", nx=True), ("SET", "k", "v", "NX")),
        (lambda: ops.set("k", "v", xx=True), ("SET", "k", "v", "XX")),
        (lambda: ops.set("k", "v", keepttl=True), ("SET", "k", "v", "KEEPTTL")),
        (lambda: ops.set("k", "v", keepttl=True, xx=True), ("SET", "k", "v", "XX", "KEEPTTL")),
        (lambda: ops.set("k", "v", ex=10, nx=True), ("SET", "k", "v", "PXAT", NOW_MS + 10_000, "NX")),
        (lambda: ops.set(b"\xff", b"\x00\x01", px=1), ("SET", b"\xff", b"\x00\x01", "PXAT", NOW_MS + 1)),
        (lambda: ops.delete("a"), ("DEL", "a")),
        (lambda: ops.delete("a", b"b", 3), ("DEL", "a", b"b", 3)),
        (lambda: ops.hset("h", mapping={"a": 1, "b": b"2"}), ("HSET", "h", "a", 1, "b", b"2")),
        (lambda: ops.hset("h", {"a": 1}), ("HSET", "h", "a", 1)),
        (lambda: ops.hset("h", "f", "v"), ("HSET", "h", "f", "v")),
        (lambda: ops.hset("h", "f", "v", mapping={"a": 1.5}), ("HSET", "h", "f", "v", "a", 1.5)),
        (lambda: ops.hdel("h", "a", "b"), ("HDEL", "h", "a", "b")),
        (lambda: ops.sadd("s", "a", 2), ("SADD", "s", "a", 2)),
        (lambda: ops.srem("s", "a"), ("SREM", "s", "a")),
        (lambda: ops.zadd("z", {"a": 1.5, "b": 2}), ("ZADD", "z", 1.5, "a", 2, "b")),
        (lambda: ops.zadd("z", {"a": 1}, nx=True, ch=True), ("ZADD", "z", "NX", "CH", 1, "a")),
        (lambda: ops.zadd("z", {"a": 1}, xx=True, gt=True), ("ZADD", "z", "XX", "GT", 1, "a")),
        (lambda: ops.zadd("z", {"a": -math.inf}, lt=True), ("ZADD", "z", "LT", -math.inf, "a")),
        (lambda: ops.expire("k", 10), ("PEXPIREAT", "k", NOW_MS + 10_000)),
        (lambda: ops.expire("k", 10, nx=True), ("PEXPIREAT", "k", NOW_MS + 10_000, "NX")),
        (lambda: ops.expire("k", 10, xx=True, gt=True), ("PEXPIREAT", "k", NOW_MS + 10_000, "XX", "GT")),
        (lambda: ops.expire("k", 10, lt=True), ("PEXPIREAT", "k", NOW_MS + 10_000, "LT")),
        (lambda: ops.incrby("n"), ("INCRBY", "n", 1)),
        (lambda: ops.incrby("n", -5), ("INCRBY", "n", -5)),
        (lambda: ops.incrby("n", 2**80), ("INCRBY", "n", 2**80)),
        (lambda: ops.lpush("l", "a", "b"), ("LPUSH", "l", "a", "b")),
        (lambda: ops.rpush("l", b"a"), ("RPUSH", "l", b"a")),
        (lambda: ops.command("hincrby", "h", "f", 1), ("HINCRBY", "h", "f", 1)),
        (lambda: ops.command("MSET", "a", 1, "b", 2), ("MSET", "a", 1, "b", 2)),
        (lambda: ops.command("SET", "k", bytearray(b"v")), ("SET", "k", b"v")),
        (lambda: ops.command("SET", "k", memoryview(b"v")), ("SET", "k", b"v")),
    ],
)
def test_builders_build_the_exact_command(build: Any, expected: tuple[Any, ...]) -> None:
    assert only(build()) == expected


def test_set_relative_expiries_become_absolute() -> None:
    assert only(ops.set("k", "v", ex=10)) == ("SET", "k", "v", "PXAT", NOW_MS + 10_000)
    assert only(ops.set("k", "v", px=1500, xx=True)) == ("SET", "k", "v", "PXAT", NOW_MS + 1500, "XX")
    assert only(ops.set("k", "v", exat=2_000_000_000)) == ("SET", "k", "v", "PXAT", 2_000_000_000_000)


@pytest.mark.parametrize(
    ("name", "args", "expected"),
    [
        ("SET", ("k", "v", "EX", 10), ("SET", "k", "v", "PXAT", NOW_MS + 10_000)),
        ("SET", ("k", "v", "ex", "10"), ("SET", "k", "v", "PXAT", NOW_MS + 10_000)),
        ("SET", ("k", "v", b"EX", 10), ("SET", "k", "v", "PXAT", NOW_MS + 10_000)),
        ("SET", ("k", "v", "NX", "px", 5), ("SET", "k", "v", "NX", "PXAT", NOW_MS + 5)),
        ("SET", ("k", "v", b"exat", 7), ("SET", "k", "v", "PXAT", 7000)),
        ("SET", ("k", "v", "GET", "EX", 1.0), ("SET", "k", "v", "GET", "PXAT", NOW_MS + 1000)),
        ("SET", ("k", "EX", "PX", 1), ("SET", "k", "EX", "PXAT", NOW_MS + 1)),  # a value "EX" is a value
        ("SET", ("k", "v", "PXAT", 9), ("SET", "k", "v", "PXAT", 9)),
        ("SET", ("k", "v", "EX"), ("SET", "k", "v", "EX")),  # no amount: Redis refuses the syntax
        ("SETEX", ("k", 10, "v"), ("SET", "k", "v", "PXAT", NOW_MS + 10_000)),
        ("PSETEX", ("k", 1500, "v"), ("SET", "k", "v", "PXAT", NOW_MS + 1500)),
        ("EXPIRE", ("k", 10), ("PEXPIREAT", "k", NOW_MS + 10_000)),
        ("EXPIRE", ("k", 10, "GT"), ("PEXPIREAT", "k", NOW_MS + 10_000, "GT")),
        ("PEXPIRE", ("k", 1500), ("PEXPIREAT", "k", NOW_MS + 1500)),
        ("PEXPIRE", ("k", 1500, "NX"), ("PEXPIREAT", "k", NOW_MS + 1500, "NX")),
        ("EXPIREAT", ("k", 1_800_000_000), ("PEXPIREAT", "k", 1_800_000_000_000)),
        ("PEXPIREAT", ("k", 1_800_000_000_001), ("PEXPIREAT", "k", 1_800_000_000_001)),
        ("setex", ("k", 2**70, "v"), ("SET", "k", "v", "PXAT", NOW_MS + 2**70 * 1000)),
    ],
)
def test_relative_expiries_become_absolute(name: str, args: tuple[Any, ...], expected: tuple[Any, ...]) -> None:
    assert only(ops.command(name, *args)) == expected


_SET_EXPIRIES: list[dict[str, Any]] = [
    {}, {"ex": 10}, {"px": 1500}, {"exat": 1_800_000_000}, {"pxat": 1_800_000_000_123}, {"ex": "10"},
    {"px": b"5"}, {"exat": 7.0}, {"pxat": 9.5}, {"ex": bytearray(b"3")}, {"keepttl": True},
]
_SET_FLAGS: list[dict[str, Any]] = [{}, {"nx": True}, {"xx": True}, {"nx": 2}]


def _redis_py_options(options: dict[str, Any]) -> list[Any]:
    """``ops.set``'s keyword options as the words a SET command carries, in its order."""
    words: list[Any] = []
    for name in ("ex", "px", "exat", "pxat"):
        if name in options:
            words += [name.upper(), options[name]]
    for name in ("nx", "xx", "keepttl"):
        words += [name.upper()] * options.get(name, 0)
    return words


@pytest.mark.parametrize("expiry", _SET_EXPIRIES)
@pytest.mark.parametrize("flags", _SET_FLAGS)
@pytest.mark.parametrize(("key", "value"), [("k", "v"), (b"\xff", bytearray(b"v")), (1, 2.5), ("k", "EX")])
def test_set_builds_what_the_set_command_builds(expiry: dict[str, Any], flags: dict[str, Any], key: Any,
                                                value: Any) -> None:
    options = {**expiry, **flags}
    op = ops.set(key, value, **options)
    assert only(op) == only(ops.command("SET", key, value, *_redis_py_options(options)))
    assert op.created_at == NOW


@pytest.mark.parametrize(
    "options", [{"ex": 1.5}, {"px": "soon"}, {"exat": math.nan}, {"pxat": True}, {"ex": None, "px": [1]}]
)
def test_set_refuses_a_bad_expiry_as_the_set_command_does(options: dict[str, Any]) -> None:
    with pytest.raises(EncodeError) as built:
        ops.set("k", "v", **options)
    with pytest.raises(EncodeError) as commanded:
        ops.command("SET", "k", "v", *_redis_py_options({k: v for k, v in options.items() if v is not None}))
    assert str(built.value) == str(commanded.value)


def test_expiry_is_taken_at_capture_time(monkeypatch: pytest.MonkeyPatch) -> None:
    first = ops.expire("k", 60)
    monkeypatch.setattr(ops, "time", types.SimpleNamespace(time=lambda: NOW + 30))
    later = ops.expire("k", 60)
    assert only(later)[2] - only(first)[2] == 30_000
    assert first.created_at == NOW
    assert later.created_at == NOW + 30


# -- bad input is refused with a message that says why ------------------------------------


@pytest.mark.parametrize(
    ("build", "error", "words"),
    [
        (lambda: ops.set("k", True), EncodeError, ["str, bytes, int or float", "bool", "True"]),
        (lambda: ops.set("k", None), EncodeError, ["NoneType"]),
        (lambda: ops.set("k", {"a": 1}), EncodeError, ["dict"]),
        (lambda: ops.set("k", [1]), EncodeError, ["list"]),
        (lambda: ops.set("k", math.nan), EncodeError, ["SET", "NaN"]),
        (lambda: ops.sadd("s", 1, float("nan")), EncodeError, ["SADD", "NaN"]),
        (lambda: ops.zadd("z", {"a": math.nan}), EncodeError, ["ZADD", "NaN"]),
        (lambda: ops.command("GET", "k"), CommandNotAllowedError, ["'GET'", "not a Redis write command"]),
        (lambda: ops.command("FLUSHALL"), CommandNotAllowedError, ["'FLUSHALL'"]),
        (lambda: ops.command("EVAL", "return 1", 0), CommandNotAllowedError, ["'EVAL'"]),
        (lambda: ops.command("NOPE", "k"), CommandNotAllowedError, ["'NOPE'"]),
        (lambda: ops.command(b"SET", "k", "v"), EncodeError, ["command name must be a str", "bytes"]),
        (lambda: ops.command("SET", "k"), EncodeError, ["wrong number of arguments for SET: 1"]),
        (lambda: ops.command("INCR", "k", 1), EncodeError, ["wrong number of arguments for INCR: 2"]),
        (ops.delete, EncodeError, ["wrong number of arguments for DEL: 0"]),
        (lambda: ops.zadd("z", {}), EncodeError, ["wrong number of arguments for ZADD"]),
        (lambda: ops.set("k", "v", ex=1, px=1), EncodeError, ["at most one of ex, px, exat, pxat, keepttl"]),
        (lambda: ops.set("k", "v", ex=1, keepttl=True), EncodeError, ["at most one of"]),
        (lambda: ops.set("k", "v", nx=True, xx=True), EncodeError, ["nx or xx, not both"]),
        (lambda: ops.set("k", "v", ex=1.5), EncodeError, ["SET EX must be an integer, got 1.5"]),
        (lambda: ops.set("k", "v", ex=True), EncodeError, ["bool"]),
        (lambda: ops.command("SET", "k", "v", "EX", "soon"), EncodeError, ["SET EX must be an integer", "'soon'"]),
        (lambda: ops.command("SETEX", "k", "ten", "v"), EncodeError, ["SETEX seconds must be an integer"]),
        (lambda: ops.expire("k", 1.5), EncodeError, ["EXPIRE seconds must be an integer, got 1.5"]),
        (lambda: ops.hset("h"), EncodeError, ["HSET needs a field and value or a non-empty mapping"]),
        (lambda: ops.hset("h", mapping={}), EncodeError, ["non-empty mapping"]),
        (lambda: ops.hset("h", "f"), EncodeError, ["a field needs a value"]),
        (lambda: ops.hset("h", {"a": 1}, mapping={"b": 2}), EncodeError, ["pass the mapping once"]),
        (lambda: ops.hset("h", {"a": 1}, "stray"), EncodeError, ["a value needs a field"]),
        (lambda: ops.script(""), EncodeError, ["script name must be a non-empty str"]),
        (lambda: ops.script("s", keys=[None]), EncodeError, ["script s keys", "NoneType"]),
        (lambda: ops.script("s", args=[True]), EncodeError, ["script s args", "bool"]),
    ],
)
def test_bad_input_is_refused_clearly(build: Any, error: type[Exception], words: list[str]) -> None:
    with pytest.raises(error) as info:
        build()
    for word in words:
        assert word in str(info.value)


def test_pipelines_are_checked() -> None:
    with pytest.raises(EncodeError, match="at least one op"):
        ops.pipeline([])
    with pytest.raises(EncodeError, match="one target, got 'default' and 'sessions'"):
        ops.pipeline([ops.delete("a"), ops.delete("b").with_target("sessions")])
    with pytest.raises(EncodeError, match="command ops only"):
        ops.pipeline([ops.delete("a"), ops.script("s")])
    with pytest.raises(EncodeError, match="command ops only"):
        ops.pipeline([ops.pipeline([ops.delete("a")])])
    with pytest.raises(EncodeError, match="command ops only"):
        ops.pipeline([("DEL", "a")])  # type: ignore[list-item]


def test_pipeline_and_script_builders() -> None:
    a, b = ops.delete("a"), ops.set("b", 1, ex=5)
    pipe = ops.pipeline([a, b])
    assert (pipe.kind, pipe.transaction, pipe.target) == ("pipeline", True, "default")
    assert pipe.commands == (("DEL", "a"), ("SET", "b", 1, "PXAT", NOW_MS + 5000))
    assert pipe.id not in (a.id, b.id)
    assert ops.pipeline(iter([a]), transaction=False).transaction is False
    assert ops.pipeline([a.with_target("t"), b.with_target("t")]).target == "t"
    script = ops.script("rate_limit", keys=["a", b"b"], args=[1, 2.5, "x"])
    assert (script.kind, script.script) == ("script", "rate_limit")
    assert (script.keys, script.args) == (("a", b"b"), (1, 2.5, "x"))
    assert script.commands == ()
    assert ops.script("noargs").keys == ops.script("noargs").args == ()


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda op: op.with_max_retries(-1), ["max_retries must be an int >= 0, got -1"]),
        (lambda op: op.with_max_retries(1.0), ["max_retries", "1.0"]),
        (lambda op: op.with_max_retries(True), ["max_retries", "True"]),
        (lambda op: op.with_deadline(0), ["deadline must be a positive", "got 0"]),
        (lambda op: op.with_deadline(-5), ["got -5"]),
        (lambda op: op.with_deadline(math.nan), ["got nan"]),
        (lambda op: op.with_deadline(math.inf), ["finite", "got inf"]),
        (lambda op: op.with_deadline(10**400), ["finite"]),
        (lambda op: op.with_deadline(True), ["got True"]),
        (lambda op: op.with_deadline("60"), ["got '60'"]),
        (lambda op: op.with_target(""), ["target must be a non-empty string"]),
        (lambda op: op.with_target(None), ["target must be a non-empty string, got None"]),
    ],
)
def test_bad_copies_are_refused(change: Any, words: list[str]) -> None:
    with pytest.raises(EncodeError) as info:
        change(ops.delete("k"))
    for word in words:
        assert word in str(info.value)


# -- copies, immutability ----------------------------------------------------------------


def test_with_methods_return_changed_copies_and_leave_the_original() -> None:
    op = ops.set("k", "v")
    before = msgspec.structs.asdict(op)
    error = rex.TimeoutError("Timeout reading from socket")
    copies = {
        "context": op.with_context(trace_id="t1", user_uuid="u1", device_id=None, tenant=7),
        "source": op.with_source("UserRepo.save"),
        "max_retries": op.with_max_retries(9),
        "target": op.with_target("sessions"),
        "error": op.with_error(error),
        "deadline": op.with_deadline(30),
    }
    assert msgspec.structs.asdict(op) == before
    for field, copy in copies.items():
        assert copy is not op
        assert copy.id == op.id  # the same op, described further
        assert getattr(copy, field) != getattr(op, field)
        for other in msgspec.structs.asdict(op):
            if other != field:
                assert getattr(copy, other) == getattr(op, other), (field, other)
    assert dict(copies["context"].context) == {"trace_id": "t1", "user_uuid": "u1", "tenant": "7"}
    assert copies["deadline"].deadline == NOW + 30
    assert copies["error"].error == ops.ErrorInfo(
        type="redis.exceptions.TimeoutError", message="Timeout reading from socket", outcome_unknown=True
    )
    chained = op.with_context(trace_id="t").with_context(device_id="d", trace_id="t2").with_source("s")
    assert dict(chained.context) == {"trace_id": "t2", "device_id": "d"}
    assert chained.source == "s"


def test_error_messages_are_truncated() -> None:
    op = ops.delete("k").with_error(rex.ConnectionError("x" * 5000))
    assert op.error is not None
    assert len(op.error.message) == 1000
    assert op.error.outcome_unknown is True
    refused = ops.delete("k").with_error(rex.ConnectionError("Error 111 connecting to localhost:6379. Refused."))
    assert refused.error is not None
    assert refused.error.outcome_unknown is False


def test_ops_are_immutable() -> None:
    op = ops.hset("h", "f", "v").with_context(trace_id="t")
    with pytest.raises(AttributeError):
        op.target = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        op.commands = ()  # type: ignore[misc]
    with pytest.raises(TypeError):
        op.context["trace_id"] = "forged"  # type: ignore[index]
    with pytest.raises(TypeError):
        op.commands[0][1] = "other"  # type: ignore[index]
    assert isinstance(op.commands, tuple)
    assert all(isinstance(c, tuple) for c in op.commands)
    assert op.context == {"trace_id": "t"}


def test_a_caller_mapping_does_not_leak_into_the_op() -> None:
    mapping: dict[Any, Any] = {"a": 1}
    op = ops.hset("h", mapping=mapping)
    mapping["b"] = 2
    assert only(op) == ("HSET", "h", "a", 1)


# -- identity ----------------------------------------------------------------------------


def test_every_op_has_an_id_and_a_creation_time() -> None:
    op = ops.delete("k")
    assert op.id
    assert op.created_at == NOW
    assert (op.attempt, op.max_retries, op.deadline, op.source, op.error) == (0, None, None, None, None)
    assert (op.target, op.context) == ("default", {})


def test_ids_are_unique_across_100k_ops() -> None:
    ids = {ops.delete("k").id for _ in range(50_000)}
    ids |= {ops.new_op_id() for _ in range(50_000)}
    assert len(ids) == 100_000


@pytest.mark.slow
def test_ids_are_unique_across_a_fork() -> None:
    before = [ops.new_op_id() for _ in range(10)]
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its ids and leave without running any pytest teardown
        try:
            os.close(read_end)
            payload = "\n".join(ops.delete("k").id for _ in range(20_000)).encode()
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(payload)
        finally:
            os._exit(0)
    os.close(write_end)
    parent = [ops.delete("k").id for _ in range(20_000)]
    with os.fdopen(read_end, "rb") as pipe:
        child = pipe.read().decode().split("\n")
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(child) == 20_000
    assert len(set(child) | set(parent) | set(before)) == 40_010
    # The child drew a new random prefix, so even its counter restarting cannot collide.
    assert {i.split("-")[0] for i in child}.isdisjoint({i.split("-")[0] for i in parent})


# -- keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "first", "all_keys"),
    [
        (ops.set("k", "v"), "k", ["k"]),
        (ops.delete("a", b"b", 3), "a", ["a", b"b", 3]),
        (ops.command("UNLINK", "a", "b"), "a", ["a", "b"]),
        (ops.command("MSET", "a", 1, "b", 2, "c", 3), "a", ["a", "b", "c"]),
        (ops.command("MSETNX", "a", "b"), "a", ["a"]),
        (ops.command("RENAME", "old", "new"), "old", ["old", "new"]),
        (ops.command("COPY", "src", "dst", "DB", 1, "REPLACE"), "src", ["src", "dst"]),
        (ops.command("SMOVE", "from", "to", "m"), "from", ["from", "to"]),
        (ops.command("LMOVE", "a", "b", "LEFT", "RIGHT"), "a", ["a", "b"]),
        (ops.command("SINTERSTORE", "dst", "s1", "s2"), "dst", ["dst", "s1", "s2"]),
        (ops.hset("h", mapping={"f1": 1, "f2": 2}), "h", ["h"]),
        (ops.zadd("z", {"m": 1}), "z", ["z"]),
        (ops.command("XADD", "stream", "*", "f", "v"), "stream", ["stream"]),
        (ops.script("s", keys=["a", b"b"], args=["not-a-key"]), "a", ["a", b"b"]),
        (ops.script("s", args=["x"]), None, []),
        (ops.pipeline([ops.delete("a", "b"), ops.command("RENAME", "c", "d"), ops.incrby("e")]), "a",
         ["a", "b", "c", "d", "e"]),
    ],
)
def test_first_key_and_all_keys(op: RedisOp, first: Any, all_keys: list[Any]) -> None:
    assert op.first_key == first
    assert op.all_keys() == all_keys


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_ops())
def test_the_first_key_is_the_first_of_all_keys(op: RedisOp) -> None:
    keys = op.all_keys()
    assert op.first_key == (keys[0] if keys else None)
    assert keys or op.kind == "script"


@pytest.mark.parametrize(
    ("command", "idempotent"),
    [
        (("SET", "k", "v"), True),
        (("SET", "k", "v", "PXAT", 1), True),
        (("ZADD", "z", 1, "m"), True),
        (("ZADD", "z", "NX", "CH", 1, "m"), True),
        (("ZADD", "z", "INCR", 1, "m"), False),
        (("ZADD", "z", "XX", "incr", 1, "m"), False),
        (("ZADD", "z", b"INCR", 1, "m"), False),
        (("zadd", "z", "INCR", 1, "m"), False),
        (("INCRBY", "n", 1), False),
        (("INCR", "n"), False),
        (("HINCRBY", "h", "f", 1), False),
        (("LPUSH", "l", "x"), False),
        (("RENAME", "a", "b"), False),
        (("DEL", "a"), True),
        (("PEXPIREAT", "k", 1), True),
        (("HSET", "h", "f", "v"), True),
    ],
)
def test_is_idempotent(command: tuple[Any, ...], idempotent: bool) -> None:
    assert commands.is_idempotent(command) is idempotent


def test_the_command_table_is_consistent() -> None:
    for name, spec in commands.COMMANDS.items():
        assert name == spec.name == name.upper()
        assert spec.arity != 0
        assert spec.first_key >= 1
        assert spec.key_step >= 1
        argc = max(abs(spec.arity), spec.first_key + 1)
        positions = spec.key_positions(argc)
        assert positions
        assert positions[0] == spec.first_key
    for forbidden in ("GET", "EVAL", "EVALSHA", "FLUSHALL", "FLUSHDB", "CONFIG", "SCRIPT", "KEYS", "SHUTDOWN",
                      "MIGRATE", "MODULE", "DEBUG", "ZUNIONSTORE"):
        assert forbidden not in commands.COMMANDS
        with pytest.raises(CommandNotAllowedError):
            commands.spec_for(forbidden)
    assert commands.spec_for("set") is commands.COMMANDS["SET"]
    assert frozenset(commands.COMMANDS) == commands.DEFAULT_ALLOWED
