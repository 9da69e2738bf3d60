"""Wire format v1: exact round trips, a decoder that only ever raises DecodeError, limits, signing."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import args, exact, ops, texts

from celery_redis_retry import message
from celery_redis_retry import ops as builders
from celery_redis_retry.errors import CommandNotAllowedError, DecodeError, SignatureError, UnsupportedVersionError
from celery_redis_retry.message import MAX_ARGS, MAX_COMMANDS, Signer

SIGNER = Signer({"k1": b"x" * 32})
FAST = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOME = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def raw_of(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode()


def valid_document(**changes: Any) -> dict[str, Any]:
    document = {"v": 1, "id": "abc-1", "kind": "command", "created_at": 1.5, "cmds": [["SET", "k", "v"]]}
    document.update(changes)
    return document


def decode_error(raw: bytes, *, signer: Signer | None = None, max_bytes: int = 1_000_000) -> DecodeError:
    """The DecodeError ``decode`` raises for ``raw``; fails the test if it returns or raises anything else."""
    with pytest.raises(DecodeError) as info:
        message.decode(raw, signer=signer, max_bytes=max_bytes)
    return info.value


# -- round trips -------------------------------------------------------------------------


@FAST
@given(ops())
def test_every_op_round_trips_exactly(op: builders.RedisOp) -> None:
    raw = message.encode(op)
    back = message.decode(raw)
    assert back == op
    assert exact(back) == exact(op)  # 1 vs 1.0 vs True, -0.0 vs 0.0, bytes vs str all kept
    assert message.encode(back) == raw
    assert message.message_key(back) == message.message_key(op)


@FAST
@given(ops())
def test_every_signed_op_round_trips_exactly(op: builders.RedisOp) -> None:
    raw = message.encode(op, SIGNER)
    back = message.decode(raw, signer=SIGNER)
    assert exact(back) == exact(op)
    # A reader without keys ignores the signature; with keys it needs one.
    assert exact(message.decode(raw)) == exact(op)
    assert isinstance(decode_error(message.encode(op), signer=SIGNER), SignatureError)


@SOME
@given(st.lists(args(), min_size=1, max_size=8))
def test_arguments_keep_their_python_type(values: list[Any]) -> None:
    op = builders.command("RPUSH", "k", *values)
    back = message.decode(message.encode(op))
    assert [(type(v), repr(v)) for v in back.commands[0]] == [(type(v), repr(v)) for v in op.commands[0]]


def test_binary_values_travel_as_tagged_base64() -> None:
    value = bytes(range(256))
    raw = message.encode(builders.set("k", value))
    document = json.loads(raw)
    assert document["cmds"] == [["SET", "k", {"b": base64.b64encode(value).decode()}]]
    assert message.decode(raw).commands[0][2] == value


def test_infinite_floats_travel_as_tags_and_big_ints_as_json_numbers() -> None:
    op = builders.zadd("z", {"a": float("inf"), "b": float("-inf")})
    document = json.loads(message.encode(op))
    assert document["cmds"][0][2:] == [{"f": "inf"}, "a", {"f": "-inf"}, "b"]
    big = builders.command("SET", "k", 2**100)
    assert b"1267650600228229401496703205376" in message.encode(big)
    assert message.decode(message.encode(big)).commands[0][2] == 2**100


@FAST
@given(ops())
def test_encode_writes_exactly_the_op_document(op: builders.RedisOp) -> None:
    assert message.encode(op) == message.dumps(message.op_document(op))


@pytest.mark.parametrize(
    "op",
    [
        builders.set("k", "null").with_source("null").with_context(trace_id="null"),
        builders.set(b"\x00k", b"\xff").if_value(b"old"),
        builders.set("k", "v").if_value(float("inf")),
        builders.hset("h", "f", 1.5).if_value(float("-inf"), field="f"),
        builders.set("k", float("inf")),
        builders.pipeline([builders.set("a", b"\x01"), builders.zadd("z", {"m": float("-inf")})], transaction=False),
        builders.script("s", keys=[b"k", "j"], args=[float("inf"), 2**70, b""]),
        builders.command("INCRBY", "k", 2**64).if_version(2**65, field="v"),
        builders.delete("k").with_error(RuntimeError("null")).with_max_retries(0).with_deadline(5),
    ],
    ids=lambda op: f"{op.kind}-{op.commands[:1] or op.script}",
)
def test_encode_tags_bytes_and_infinities_wherever_they_are(op: builders.RedisOp) -> None:
    raw = message.encode(op)
    assert raw == message.dumps(message.op_document(op))
    assert b"null" not in raw.replace(b'"null"', b"")  # no argument was written as JSON null
    assert exact(message.decode(raw)) == exact(op)


def test_unicode_survives_including_nul() -> None:
    op = builders.hset("h", "\x00é€😀", "\u2028\ufeff")
    assert message.decode(message.encode(op)) == op


# -- the decoder never raises anything but DecodeError ----------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | texts(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts(max_size=8), inner, max_size=4),
    max_leaves=12,
)
wire_args = st.one_of(
    json_values,
    st.sampled_from(["SET", "set", "DEL", "HSET", "GET", "EVAL", "FLUSHALL"]),
    st.fixed_dictionaries(
        {},
        optional={
            "b": st.one_of(texts(), st.binary(max_size=8).map(lambda b: base64.b64encode(b).decode()), json_values),
            "f": st.sampled_from(["inf", "-inf", "nan", "INF", 1, None]),
            "x": json_values,
        },
    ),
)
# Documents shaped like ops, so the decoder's later checks get exercised too; a field
# holds either what it should or some small JSON value of another type.
scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | texts()
junk = scalars | st.lists(scalars, max_size=2) | st.dictionaries(texts(max_size=4), scalars, max_size=2)
op_documents = st.fixed_dictionaries(
    {},
    optional={
        "v": st.one_of(st.just(1), junk),
        "id": st.one_of(texts(), junk),
        "kind": st.one_of(st.sampled_from(["command", "pipeline", "script"]), junk),
        "created_at": st.one_of(st.floats(allow_nan=False, allow_infinity=False), junk),
        "target": st.one_of(texts(), junk),
        "cmds": st.one_of(st.lists(st.lists(wire_args, max_size=5), max_size=3), junk),
        "tx": st.one_of(st.booleans(), junk),
        "script": st.one_of(texts(), junk),
        "keys": st.one_of(st.lists(wire_args, max_size=3), junk),
        "args": st.one_of(st.lists(wire_args, max_size=3), junk),
        "attempt": junk,
        "max_retries": junk,
        "deadline": junk,
        "ctx": st.one_of(st.dictionaries(texts(), texts(), max_size=3), junk),
        "source": junk,
        "error": st.one_of(
            st.fixed_dictionaries({"type": texts(), "message": texts()}, optional={"outcome_unknown": junk}),
            junk,
        ),
        "sig": junk,
    },
)


def decodes_or_refuses(raw: bytes, signer: Signer | None = None) -> builders.RedisOp | DecodeError:
    try:
        return message.decode(raw, signer=signer)
    except DecodeError as exc:
        refusal = exc
    assert str(refusal)  # every refusal says what is wrong
    return refusal


@FAST
@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_raise_decode_error(raw: bytes) -> None:
    decodes_or_refuses(raw)
    assert isinstance(decodes_or_refuses(raw, SIGNER), SignatureError)


@FAST
@given(json_values)
def test_arbitrary_json_only_raises_decode_error(document: Any) -> None:
    decodes_or_refuses(json.dumps(document).encode())


@SOME
@given(op_documents)
def test_op_shaped_json_only_raises_decode_error(document: dict[str, Any]) -> None:
    result = decodes_or_refuses(raw_of(document))
    if isinstance(result, builders.RedisOp):
        # Whatever the decoder accepts, it can write back and read again.
        assert message.decode(message.encode(result)).id == result.id


WIRE_FIELDS = frozenset(
    ("v", "id", "kind", "created_at", "target", "cmds", "tx", "script", "keys", "args", "attempt", "max_retries",
     "deadline", "ctx", "source", "error", "sig")
)
mutations = st.sampled_from(["truncate", "flip", "version", "drop", "add", "replace"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops(), mutations, st.data())
def test_mutated_messages_only_raise_decode_error(op: builders.RedisOp, how: str, data: st.DataObject) -> None:
    raw = message.encode(op)
    document = json.loads(raw)
    # Ids and times differ from run to run, and so does len(raw): positions are drawn as fractions.
    at = int(data.draw(st.floats(0, 1, exclude_max=True)) * len(raw))
    if how == "truncate":
        mutated = raw[:at]
        assert isinstance(decodes_or_refuses(mutated), DecodeError)
        return
    if how == "flip":
        mutated = raw[:at] + bytes([raw[at] ^ data.draw(st.integers(1, 255))]) + raw[at + 1 :]
        decodes_or_refuses(mutated)
        return
    if how == "version":
        document["v"] = data.draw(json_values.filter(lambda v: v != 1))
        assert isinstance(decodes_or_refuses(raw_of(document)), UnsupportedVersionError)
        return
    if how == "drop":
        field = data.draw(st.sampled_from(sorted(document)))
        del document[field]
        result = decodes_or_refuses(raw_of(document))
        if field in ("v", "id", "kind", "created_at"):
            assert isinstance(result, DecodeError)
            assert f"`{field}`" in str(result)
            assert not isinstance(result, UnsupportedVersionError)
        return
    if how == "add":
        field = data.draw(texts(min_size=1).filter(lambda name: name not in WIRE_FIELDS and name.isidentifier()))
        document[field] = data.draw(json_values)
        result = decodes_or_refuses(raw_of(document))
        assert isinstance(result, DecodeError)
        assert f"unknown field `{field}`" in str(result)
        return
    field = data.draw(st.sampled_from(sorted(document)))
    document[field] = data.draw(json_values)
    decodes_or_refuses(raw_of(document))


@SOME
@given(ops(), st.data())
def test_any_byte_change_to_a_signed_message_breaks_the_signature(op: builders.RedisOp, data: st.DataObject) -> None:
    raw = message.encode(op, SIGNER)
    at = int(data.draw(st.floats(0, 1, exclude_max=True)) * len(raw))  # len(raw) varies with ids and times
    mutated = raw[:at] + bytes([raw[at] ^ data.draw(st.integers(1, 255))]) + raw[at + 1 :]
    assert isinstance(decode_error(mutated, signer=SIGNER), SignatureError)


# -- limits ------------------------------------------------------------------------------


def test_a_message_over_max_bytes_is_refused_before_parsing() -> None:
    huge = message.encode(builders.set("k", b"x" * 1_000_000))  # valid, 1.33 MB
    assert message.decode(huge, max_bytes=2_000_000).commands[0][2] == b"x" * 1_000_000
    error = decode_error(huge)
    assert f"{len(huge)} bytes" in str(error)
    assert "1000000-byte limit" in str(error)
    # Garbage of the same size gets the same answer: the parser never saw it.
    assert "byte limit" in str(decode_error(b"[" * len(huge)))
    # Even a signed message: its size is checked before its signature.
    assert not isinstance(decode_error(message.encode(builders.set("k", "x" * 2000), SIGNER), max_bytes=1024),
                          SignatureError)


def test_argument_count_is_limited() -> None:
    at_limit = builders.sadd("s", *range(MAX_ARGS - 2))  # name + key + members == MAX_ARGS
    assert len(message.decode(message.encode(at_limit)).commands[0]) == MAX_ARGS
    error = decode_error(message.encode(builders.sadd("s", *range(MAX_ARGS - 1))))
    assert f"<= {MAX_ARGS}" in str(error)
    assert "$.cmds[0]" in str(error)
    error = decode_error(message.encode(builders.script("s", keys=range(MAX_ARGS + 1))))
    assert f"<= {MAX_ARGS}" in str(error)
    assert "$.keys" in str(error)


def test_pipeline_length_is_limited() -> None:
    op = builders.pipeline([builders.delete("k")] * (MAX_COMMANDS + 1))
    error = decode_error(message.encode(op))
    assert f"<= {MAX_COMMANDS}" in str(error)
    assert "$.cmds" in str(error)
    assert len(message.decode(message.encode(builders.pipeline([builders.delete("k")] * MAX_COMMANDS))).commands) \
        == MAX_COMMANDS


@pytest.mark.parametrize(
    "template",
    [
        b"%s",
        b'{"v":%s}',
        b'{"x":%s}',  # an unknown field, skipped by the version probe
        b'{"v":1,"id":"a","kind":"command","created_at":1,"cmds":[["SET","k",%s]]}',
        b'{"v":1,"id":"a","kind":"command","created_at":1,"cmds":[%s]}',
        b'{"v":2,"ctx":%s}',
    ],
)
@pytest.mark.parametrize("nest", [(b"[", b"]"), (b'{"a":', b"}")])
def test_deep_nesting_is_refused_quickly(template: bytes, nest: tuple[bytes, bytes]) -> None:
    opening, closing = nest
    deep = opening * 10_000 + b"1" + closing * 10_000
    started = time.perf_counter()
    error = decode_error(template % deep)  # RecursionError would fail here
    assert time.perf_counter() - started < 1.0
    assert str(error)


@pytest.mark.parametrize(
    ("changes", "where"),
    [
        ({"target": "t" * 257}, "$.target"),
        ({"id": ""}, "$.id"),
        ({"source": "s" * 4097}, "$.source"),
        ({"ctx": {f"k{i}": "v" for i in range(65)}}, "$.ctx"),
        ({"ctx": {"k": "v" * 4097}}, "$.ctx"),
        ({"max_retries": 10_001}, "$.max_retries"),
        ({"attempt": -1}, "$.attempt"),
    ],
)
def test_field_limits_name_the_field(changes: dict[str, Any], where: str) -> None:
    assert where in str(decode_error(raw_of(valid_document(**changes))))


# -- what the decoder refuses, and how it says so -----------------------------------------


@pytest.mark.parametrize("version", [0, 2, 99, "1", None, [1]])
def test_unknown_version(version: Any) -> None:
    error = decode_error(raw_of(valid_document(v=version)))
    assert isinstance(error, UnsupportedVersionError)
    assert f"version {version!r}" in str(error)
    assert error.reason == "unsupported_version"


def test_missing_version_is_malformed_not_unsupported() -> None:
    document = valid_document()
    del document["v"]
    error = decode_error(raw_of(document))
    assert not isinstance(error, UnsupportedVersionError)
    assert "missing required field `v`" in str(error)
    assert not isinstance(decode_error(b"{}"), UnsupportedVersionError)


@pytest.mark.parametrize("name", ["FLUSHALL", "EVAL", "GET", "CONFIG", "flushall", "SCRIPT", "MIGRATE"])
def test_forbidden_or_unknown_commands(name: str) -> None:
    error = decode_error(raw_of(valid_document(cmds=[[name, "x", "y"]])))
    assert isinstance(error, CommandNotAllowedError)
    assert repr(name) in str(error)
    assert "$.cmds[0][0]" in str(error)
    error = decode_error(raw_of(valid_document(kind="pipeline", cmds=[["DEL", "k"], [name, "x"]])))
    assert isinstance(error, CommandNotAllowedError)
    assert "$.cmds[1][0]" in str(error)


def test_command_names_are_normalised() -> None:
    assert message.decode(raw_of(valid_document(cmds=[["set", "k", "v"]]))).commands == (("SET", "k", "v"),)


@pytest.mark.parametrize(
    ("cmds", "expected"),
    [
        ([["SET", "k"]], "wrong number of arguments for SET at $.cmds[0]"),
        ([["INCR", "k", 1]], "wrong number of arguments for INCR at $.cmds[0]"),
        ([["DEL"]], "wrong number of arguments for DEL at $.cmds[0]"),
        ([[1, "k"]], "command name must be a string at $.cmds[0][0]"),
        ([[{"b": "U0VU"}, "k", "v"]], "command name must be a string at $.cmds[0][0]"),
        ([[]], "$.cmds[0]"),
        ([["SET", "k", ["nested"]]], "$.cmds[0][2]"),
        ([["SET", "k", True]], "$.cmds[0][2]"),
        ([["SET", "k", None]], "$.cmds[0][2]"),
    ],
)
def test_bad_commands(cmds: list[Any], expected: str) -> None:
    assert expected in str(decode_error(raw_of(valid_document(cmds=cmds))))


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"kind": "script", "script": "s"}, "a script op needs 'script' and no 'cmds'"),
        ({"kind": "script", "cmds": []}, "a script op needs 'script' and no 'cmds'"),
        ({"cmds": [["DEL", "a"], ["DEL", "b"]]}, "a command op needs one command"),
        ({"cmds": []}, "a command op needs one command"),
        ({"kind": "pipeline", "cmds": []}, "a pipeline op needs commands"),
        ({"script": "s"}, "a command op carries 'cmds', not 'script', 'keys' or 'args'"),
        ({"kind": "pipeline", "keys": ["k"]}, "a pipeline op carries 'cmds', not 'script', 'keys' or 'args'"),
        ({"kind": "query"}, "$.kind"),
        ({"created_at": "now"}, "$.created_at"),
        ({"error": {"type": "X"}}, "`message`"),
        ({"sig": {"kid": "k1"}}, "`mac`"),
    ],
)
def test_kind_and_fields_must_agree(changes: dict[str, Any], expected: str) -> None:
    assert expected in str(decode_error(raw_of(valid_document(**changes))))


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        ({"b": "not base64!"}, "invalid base64 in bytes argument at $.cmds[0][2]"),
        ({"b": "YWJ"}, "invalid base64 in bytes argument at $.cmds[0][2]"),
        ({"b": "YW Jj"}, "invalid base64 in bytes argument at $.cmds[0][2]"),
        ({"b": "é"}, "invalid base64 in bytes argument at $.cmds[0][2]"),
        ({"b": "YQ==", "f": "inf"}, "exactly one of 'b' or 'f' at $.cmds[0][2]"),
        ({}, "exactly one of 'b' or 'f' at $.cmds[0][2]"),
        ({"b": None}, "exactly one of 'b' or 'f' at $.cmds[0][2]"),
        ({"f": "nan"}, "$.cmds[0][2].f"),
        ({"b": "YQ==", "x": 1}, "unknown field `x`"),
    ],
)
def test_bad_tagged_arguments(tag: dict[str, Any], expected: str) -> None:
    assert expected in str(decode_error(raw_of(valid_document(cmds=[["SET", "k", tag]]))))


@pytest.mark.parametrize("field", ["created_at", "deadline"])
def test_non_finite_times_are_refused(field: str) -> None:
    raw = raw_of(valid_document(created_at=1.5, deadline=2.5)).replace(b"1.5" if field == "created_at" else b"2.5",
                                                                       b"-1e999")
    assert f"Number out of range - at `$.{field}`" in str(decode_error(raw))


@pytest.mark.parametrize("created_at", [1e308, -1e308, 9.1e9])
def test_times_whose_write_stamp_would_not_be_exact_are_refused(created_at: float) -> None:
    error = decode_error(raw_of(valid_document(created_at=created_at)))
    assert "created_at" in str(error)
    assert "outside" in str(error)


def test_tagged_arguments_in_script_keys_name_their_place() -> None:
    document = valid_document(kind="script", script="s", keys=["a", {"b": "?"}])
    del document["cmds"]
    assert "$.keys[1]" in str(decode_error(raw_of(document)))


@pytest.mark.parametrize(
    "raw",
    [
        b'{"v":1,"id":"a","kind":"command","created_at":1,"cmds":[["SET","k","\xe1"]]}',  # in a value
        b'{"v":1,"id":"a\xff","kind":"command","created_at":1,"cmds":[["SET","k","v"]]}',
        b'{"v":1,"\xe1id":"a","kind":"command","created_at":1,"cmds":[["SET","k","v"]]}',  # in a field name
        b'{"v":1,"id":"a","kind":"command","created_at":1,"cmds":[["SET","k","v"]],"ctx":{"\xc3":"x"}}',
        b'{"\xe1":1}',
    ],
)
def test_invalid_utf8_anywhere_is_a_decode_error(raw: bytes) -> None:
    assert "invalid message" in str(decode_error(raw))


@pytest.mark.parametrize("raw", [b"", b"{", b"null", b"[]", b'"op"', b"\xff\xfe", b"{} {}"])
def test_not_an_object(raw: bytes) -> None:
    assert "invalid message" in str(decode_error(raw))


def test_only_bytes_are_decoded() -> None:
    assert "must be bytes, got str" in str(decode_error("{}"))  # type: ignore[arg-type]
    raw = message.encode(builders.delete("k"))
    assert message.decode(bytearray(raw)) == message.decode(memoryview(raw)) == message.decode(raw)


# -- signing -----------------------------------------------------------------------------


def test_signed_message_layout() -> None:
    # The documented form: the unsigned message with a last member "sig" whose mac is the
    # hex HMAC-SHA256 of the unsigned bytes.
    op = builders.delete("k")
    unsigned = message.encode(op)
    mac = hmac.new(b"x" * 32, unsigned, hashlib.sha256).hexdigest().encode()
    assert message.encode(op, SIGNER) == unsigned[:-1] + b',"sig":{"kid":"k1","mac":"' + mac + b'"}}'


def test_unsigned_message_is_refused_when_keys_are_configured() -> None:
    error = decode_error(message.encode(builders.delete("k")), signer=SIGNER)
    assert isinstance(error, SignatureError)
    assert "not signed" in str(error)
    assert error.reason == "bad_signature"


def test_unknown_key_id() -> None:
    raw = message.encode(builders.delete("k"), Signer({"other": b"y" * 32}))
    error = decode_error(raw, signer=SIGNER)
    assert isinstance(error, SignatureError)
    assert "unknown key id 'other'" in str(error)


def test_tampered_mac_and_body() -> None:
    raw = message.encode(builders.delete("k"), SIGNER)
    last = raw[-4:-3]
    tampered_mac = raw[:-4] + (b"0" if last != b"0" else b"1") + raw[-3:]
    error = decode_error(tampered_mac, signer=SIGNER)
    assert isinstance(error, SignatureError)
    assert "bad signature (key id 'k1')" in str(error)
    tampered_body = raw.replace(b'"k"', b'"j"', 1)
    assert "bad signature" in str(decode_error(tampered_body, signer=SIGNER))
    other_secret = message.encode(builders.delete("k"), Signer({"k1": b"z" * 32}))
    assert "bad signature" in str(decode_error(other_secret, signer=SIGNER))


@pytest.mark.parametrize(
    "rewrite",
    [
        lambda raw: raw + b" ",  # trailing bytes after the signature
        lambda raw: raw.replace(b',"sig":', b',"sig" :'),
        lambda raw: raw[:-2] + b',"x":1}}',
        lambda raw: raw.upper(),  # an upper-case mac is not the canonical form
    ],
)
def test_signature_must_be_the_exact_last_member(rewrite: Any) -> None:
    raw = message.encode(builders.delete("k"), SIGNER)
    assert isinstance(decode_error(rewrite(raw), signer=SIGNER), SignatureError)


def test_key_rotation() -> None:
    old, new = Signer({"A": b"a" * 32}), Signer({"B": b"b" * 32})
    both = Signer({"A": b"a" * 32, "B": b"b" * 32})
    op = builders.delete("k")
    assert message.decode(message.encode(op, new), signer=both) == op
    assert message.decode(message.encode(op, old), signer=both) == op
    assert both.key_id == "A"
    signed = message.encode(op, both)
    assert b'"kid":"A"' in signed
    assert message.decode(signed, signer=old) == op
    assert "unknown key id 'A'" in str(decode_error(signed, signer=new))


def test_signer_refuses_no_keys_and_bad_key_ids() -> None:
    with pytest.raises(ValueError, match="at least one key"):
        Signer({})
    with pytest.raises(ValueError, match="signing key id 'bad id'"):
        Signer({"bad id": b"x" * 32})
    with pytest.raises(ValueError, match="signing key id"):
        Signer({"k" * 65: b"x" * 32})


# -- the Kafka message key ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "expected"),
    [
        (builders.set("user:1", "v"), b"default\x00user:1"),
        (builders.set(b"\xff\x00k", "v"), b"default\x00\xff\x00k"),
        (builders.set(42, "v"), b"default\x0042"),
        (builders.set("é", "v"), "default\x00é".encode()),
        (builders.set("k\ud800", "v"), b"default\x00k\xed\xa0\x80"),  # a lone surrogate, as it is
        (builders.set(1.5, "v"), b"default\x001.5"),
        (builders.set("k", "v").with_target("sessions"), b"sessions\x00k"),
        (builders.delete("a", "b"), b"default\x00a"),
        (builders.script("s", keys=["a", "b"]), b"default\x00a"),
        (builders.pipeline([builders.delete("p"), builders.delete("q")]), b"default\x00p"),
    ],
)
def test_message_key_is_target_nul_first_key(op: builders.RedisOp, expected: bytes) -> None:
    assert message.message_key(op) == expected


def test_message_key_is_the_same_for_every_op_on_one_key() -> None:
    for key in ("user:1", b"user:1"):
        same = {
            message.message_key(op)
            for op in (
                builders.set(key, "v", ex=10), builders.delete(key), builders.hset(key, "f", 1),
                builders.incrby(key, 2), builders.expire(key, 5), builders.zadd(key, {"m": 1}),
                builders.lpush(key, "x"), builders.command("PERSIST", key), builders.script("s", keys=[key]),
                builders.pipeline([builders.delete(key), builders.delete("other")], transaction=False),
                builders.command("RENAME", key, "other"),
            )
        }
        assert same == {b"default\x00user:1"}
    # Redis sees the int 7 and the str "7" as one key, and so does the partitioner.
    assert message.message_key(builders.delete(7)) == message.message_key(builders.delete("7"))
    assert message.message_key(builders.delete("k").with_target("a")) != message.message_key(builders.delete("k"))
