"""A corpus of hostile Kafka messages for the ops topic, each with the DLQ reason it must end with.

Every case is raw bytes as an attacker (or a broken producer) could put on the topic, with
no help from this package's producer: truncated and deeply nested JSON, messages over the
wire format's size limit and tiny ones, a wrong-typed value in every field of a valid op,
every administrative command alone and inside a pipeline, CRLF in names and arguments,
unknown targets and scripts, and, for a setup that signs its messages, every way a
signature can be missing or wrong. :func:`random_cases` adds seeded mutations of valid
messages whose outcome follows from how they were built.

A case's ``reason`` is one of :data:`celery_redis_retry.dlq.record.REASONS`, or None for
the few hostile-looking messages that are valid ops: applied verbatim (``effect`` names
the key they write), or, without an ``effect``, ended ``expired``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from celery_redis_retry import message, ops
from celery_redis_retry.errors import DecodeError
from celery_redis_retry.message import Reader, Signer
from celery_redis_retry.redis_commands import COMMANDS

#: The default ``redis_retry_max_message_bytes``: larger messages are never parsed.
MAX_BYTES = 1_000_000

#: Keys a hostile message would write if it got through: none of them may exist after a run.
EVAL_SENTINEL = "hostile:eval-ran"
PIPELINE_NEIGHBOUR = "hostile:pipeline-neighbour"

#: Redis keys the valid-looking cases with CRLF write verbatim (RESP is binary safe).
CRLF_KEY = "hostile:crlf\r\nFLUSHALL\r\n"
CRLF_VALUE = "*1\r\n$8\r\nFLUSHALL\r\n"

#: Every administrative command a forged message might try, as the Redis command it would be.
FORBIDDEN: dict[str, list[Any]] = {
    "flushall": ["FLUSHALL"],
    "flushdb": ["FLUSHDB"],
    "config_set": ["CONFIG", "SET", "dir", "/tmp"],
    "eval_source": ["EVAL", f"redis.call('SET', '{EVAL_SENTINEL}', '1')", 0],
    "script_flush": ["SCRIPT", "FLUSH"],
    "function_flush": ["FUNCTION", "FLUSH"],
    "debug_sleep": ["DEBUG", "SLEEP", 5],
    "shutdown": ["SHUTDOWN", "NOSAVE"],
    "module_load": ["MODULE", "LOAD", "/tmp/hostile.so"],
    "acl_setuser": ["ACL", "SETUSER", "hostile", "on", ">pw", "~*", "+@all"],
    "replicaof": ["REPLICAOF", "127.0.0.1", "1"],
    "migrate": ["MIGRATE", "127.0.0.1", 1, "k", 0, 1000],
    "keys": ["KEYS", "*"],
    "select": ["SELECT", 1],
    "flushall_lower": ["flushall"],
}

#: JSON values of each type, to put where a field wants another.
WRONG_VALUES: dict[str, Any] = {
    "int": 7, "float": 1.5, "bool": True, "null": None, "str": "x", "list": [], "object": {},
}

#: The JSON types each field of wire format v1 accepts (see ``_WireOp`` in message.py).
ACCEPTED: dict[str, set[str]] = {
    "id": {"str"}, "kind": {"str"}, "created_at": {"int", "float"}, "target": {"str"}, "cmds": {"list"},
    "tx": {"bool"}, "script": {"str", "null"}, "keys": {"list"}, "args": {"list"}, "attempt": {"int"},
    "max_retries": {"int", "null"}, "deadline": {"int", "float", "null"}, "ctx": {"object"},
    "source": {"str", "null"}, "error": {"object", "null"}, "guard": {"object", "null"},
}

#: Values of the right container type with a wrong-typed member.
WRONG_INSIDE: dict[str, Any] = {
    "cmds": [[7, "k"]], "keys": [[1]], "args": [{"x": 1}], "ctx": {"a": 1},
    "error": {"type": 1, "message": "m"}, "guard": {"kind": "value", "key": [], "expected": "x"},
}


@dataclass(frozen=True)
class Case:
    """One hostile message: its Kafka value and key, and how it must end."""

    name: str
    value: bytes | None
    reason: str | None  # the DLQ reason; None: a valid op, applied (see ``effect``) or expired
    key: bytes | None = None
    #: Already signed (or deliberately mis-signed): sent as is in a signed setup.
    presigned: bool = False
    #: For a case that is applied: the Redis key it writes and the value that key must end with.
    effect: tuple[str, bytes] | None = None

    def in_signed_setup(self, signer: Signer) -> Case:
        """This case as sent to a setup that signs: signed when it is a JSON object under the size
        limit, else sent as is and refused for its missing signature (the size is checked first; the
        bridge reads a null value as empty bytes)."""
        value = self.value
        if self.presigned or (value is not None and len(value) > MAX_BYTES):
            return self
        if value is not None and value.startswith(b"{") and value.endswith(b"}") and len(value) > 2:
            return Case(self.name, signer.sign(value), self.reason, self.key, presigned=True, effect=self.effect)
        return Case(self.name, value, "bad_signature", self.key, presigned=True)


def valid_document(key: str = "hostile:never-written") -> dict[str, Any]:
    """A valid command op with every optional field set, as the JSON document of the wire format."""
    op = (
        ops.incrby(key, 1).with_max_retries(3).with_deadline(600).with_context(trace_id="t", extra="e")
        .with_source("Hostile.corpus").with_error(ConnectionError("down")).if_absent(key=key)
    )
    document: dict[str, Any] = orjson.loads(message.encode(op))
    document["attempt"] = 1
    return document


def _raw(document: Any) -> bytes:
    return orjson.dumps(document)


def _op(cmds: list[list[Any]], kind: str = "command", **fields: Any) -> bytes:
    document = {**valid_document(), "kind": kind, "cmds": cmds, **fields}
    del document["guard"]  # a guard names a key of its own: leave only the commands under test
    return _raw(document)


def truncated_cases() -> Iterator[Case]:
    whole = _raw(valid_document())
    for cut in (1, len(whole) // 3, len(whole) // 2, len(whole) - 1):
        yield Case(f"truncated_at_{cut}", whole[:cut], "malformed")
    yield Case("unterminated_string", b'{"v":1,"id":"abc', "malformed")


def nesting_cases(depth: int = 100_000) -> Iterator[Case]:
    lists, objects = b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth
    yield Case("deep_lists_top_level", lists, "malformed")
    yield Case("deep_objects_top_level", objects, "malformed")
    body = _raw(valid_document())[:-1]
    yield Case("deep_lists_in_ctx", body + b',"ctx":' + lists + b"}", "malformed")
    yield Case("deep_lists_in_unknown_field", body + b',"zz":' + lists + b"}", "malformed")
    yield Case("deep_lists_in_version", b'{"v":' + lists + b"}", "malformed")


def size_cases() -> Iterator[Case]:
    yield Case("over_limit_garbage", b"x" * (MAX_BYTES + 200_000), "malformed")
    big = ops.set("hostile:big", "v" * (MAX_BYTES + 1))
    yield Case("over_limit_valid_op", message.encode(big), "malformed", key=message.message_key(big))
    yield Case("over_limit_by_one_byte", b" " * (MAX_BYTES + 1 - 2) + b"{}", "malformed")


def tiny_cases() -> Iterator[Case]:
    for name, value in {
        "null_value": None, "empty": b"", "empty_object": b"{}", "one_byte": b"x", "open_brace": b"{",
        "json_null": b"null", "json_number": b"0", "invalid_utf8": b"\xff", "nul_byte": b"\x00",
        "empty_list": b"[]", "only_version": b'{"v":1}',
    }.items():
        yield Case(f"tiny_{name}", value, "malformed")


def wrong_type_cases() -> Iterator[Case]:
    """A wrong-typed value in every field of a valid op, one field at a time."""
    for field, accepted in ACCEPTED.items():
        for type_name, value in WRONG_VALUES.items():
            if type_name not in accepted:
                yield Case(f"wrong_{field}_{type_name}", _raw({**valid_document(), field: value}), "malformed")
        if field in WRONG_INSIDE:
            yield Case(f"wrong_inside_{field}", _raw({**valid_document(), field: WRONG_INSIDE[field]}), "malformed")
    # A "v" of another type is read as another version; ``true`` equals 1 in Python, so it is no
    # version at all, and the schema refuses it as malformed.
    for type_name, value in WRONG_VALUES.items():
        if type_name != "int":
            reason = "malformed" if value is True else "unsupported_version"
            yield Case(f"wrong_v_{type_name}", _raw({**valid_document(), "v": value}), reason)
    yield Case("other_version", _raw({**valid_document(), "v": 2}), "unsupported_version")


def forbidden_cases() -> Iterator[Case]:
    """Each administrative command alone, and next to a valid command in a pipeline and a transaction."""
    neighbour = ["SET", PIPELINE_NEIGHBOUR, "1"]
    for name, command in FORBIDDEN.items():
        yield Case(f"forbidden_{name}", _op([command]), "forbidden_command")
        yield Case(f"forbidden_{name}_in_pipeline", _op([neighbour, command], "pipeline", tx=False),
                   "forbidden_command")
        yield Case(f"forbidden_{name}_in_transaction", _op([command, neighbour], "pipeline", tx=True),
                   "forbidden_command")


def crlf_cases() -> Iterator[Case]:
    """CRLF where the RESP protocol would split commands: names are refused, arguments are data."""
    for label, name in {"after": "SET\r\nFLUSHALL", "trailing": "FLUSHALL\r\n", "leading": "\r\nSET"}.items():
        yield Case(f"crlf_in_command_name_{label}", _op([[name, "hostile:crlf-name", "1"]]), "forbidden_command")
    # Valid ops: Redis receives the key and value as length-prefixed bulk strings, verbatim.
    yield Case("crlf_in_key_applied_verbatim", _op([["SET", CRLF_KEY, CRLF_VALUE]]), None,
               effect=(CRLF_KEY, CRLF_VALUE.encode()))


def key_cases() -> Iterator[Case]:
    """Kafka keys no producer of this package writes: the bridge reads only the value."""
    yield Case("kafka_key_huge_binary", _op([["FLUSHALL"]]), "forbidden_command", key=bytes(range(256)) * 256)
    yield Case("kafka_key_of_another_target_applied", _op([["SET", "hostile:keyed", "1"]]), None,
               key=b"nowhere\x00hostile:other", effect=("hostile:keyed", b"1"))


def odd_valid_cases() -> Iterator[Case]:
    """Values the schema accepts at the edge of their range: each op must be applied once, or refused."""
    def counter(name: str, amount: int = 1, **fields: Any) -> bytes:
        return _op([["INCRBY", f"hostile:odd-{name}", amount]], **fields)

    yield Case("odd_attempt_over_64_bits", counter("attempt").replace(b'"attempt":1', b'"attempt":%d' % 2**64),
               None, effect=("hostile:odd-attempt", b"1"))
    # Older than redis_retry_max_age: ends "expired", neither applied nor dead.
    yield Case("odd_created_in_1970", counter("past", created_at=1.0), None)
    # Its write stamp (microseconds) would overflow: refused by the reader.
    yield Case("odd_created_far_future", counter("future", created_at=1e308), "malformed")
    yield Case("odd_created_far_past_overflowing", counter("far-past", created_at=-1e308), "malformed")
    yield Case("odd_id_with_crlf_and_braces", counter("id", id="{x}\r\nFLUSHALL\r\n" + "i" * 200), None,
               effect=("hostile:odd-id", b"1"))
    yield Case("odd_argument_over_64_bits", _op([["INCRBY", "hostile:odd-big", 0]]).replace(
        b'"hostile:odd-big",0', b'"hostile:odd-big",%d' % 2**70), "invalid_value")
    yield Case("odd_negative_expiry", _op([["SET", "hostile:odd-expiry", "v", "EX", -1]]), "permanent_error")


def unknown_name_cases() -> Iterator[Case]:
    yield Case("unknown_target", _op([["SET", "hostile:target", "1"]], target="nowhere"), "unknown_target")
    yield Case("unknown_target_long", _op([["SET", "hostile:target", "1"]], target="t" * 256), "unknown_target")
    script = {**valid_document(), "kind": "script", "script": "evil", "keys": ["hostile:script"], "args": [1]}
    del script["cmds"], script["guard"]
    yield Case("unknown_script", _raw(script), "unknown_script")


def signature_cases(signer: Signer, secret: bytes) -> Iterator[Case]:
    """Every way a signature can fail, for a setup whose only key is ``signer``'s."""
    op = ops.incrby("hostile:signed-never", 1)
    key, unsigned = message.message_key(op), message.encode(op)
    signed = message.encode(op, signer)
    mac_at = signed.rindex(b'"mac":"') + len(b'"mac":"')
    cases = {
        "missing_signature": unsigned,
        "signed_with_another_secret": message.encode(op, Signer({signer.key_id: secret[::-1] + b"!"})),
        "unknown_key_id": message.encode(op, Signer({"k-unknown": secret})),
        "body_byte_changed": signed.replace(b'"hostile:signed-never",1', b'"hostile:signed-never",9', 1),
        "first_byte_changed": b"[" + signed[1:],
        "mac_hex_digit_changed": _flip_hex(signed, mac_at),
        "mac_last_digit_changed": _flip_hex(signed, len(signed) - 3),
        "mac_non_hex": signed[:mac_at] + b"z" + signed[mac_at + 1:],
        "mac_truncated": signed[:mac_at] + signed[mac_at + 1:],
        "kid_byte_changed": signed.replace(b'"kid":"', b'"kid":"X', 1),
    }
    for name, value in cases.items():
        yield Case(f"signature_{name}", value, "bad_signature", key=key, presigned=True)


def _flip_hex(raw: bytes, at: int) -> bytes:
    digit = raw[at:at + 1]
    return raw[:at] + (b"0" if digit != b"0" else b"1") + raw[at + 1:]


def random_cases(count: int, seed: int = 20261204) -> Iterator[Case]:
    """``count`` seeded mutations of valid ops, each of a kind whose outcome is certain by construction:
    a proper prefix of a JSON object is never one; a 0xFF byte is never UTF-8; a command name
    outside the table is never replayed; a wrong-typed field is never accepted."""
    rng = random.Random(seed)
    fields = sorted(ACCEPTED)
    for index in range(count):
        raw = _raw(valid_document(f"hostile:random-{index}"))
        kind = rng.choice(("prefix", "invalid_utf8", "command_name", "wrong_type"))
        if kind == "prefix":
            yield Case(f"random_{index}_prefix", raw[:rng.randrange(1, len(raw) - 1)], "malformed")
        elif kind == "invalid_utf8":
            at = rng.randrange(1, len(raw) - 1)
            yield Case(f"random_{index}_invalid_utf8", raw[:at] + b"\xff" + raw[at:], "malformed")
        elif kind == "command_name":
            name = _random_name(rng)
            yield Case(f"random_{index}_command_name", _op([[name, "hostile:random", "1"]]), "forbidden_command")
        else:
            field = rng.choice(fields)
            wrong = rng.choice([t for t in WRONG_VALUES if t not in ACCEPTED[field]])
            document = {**valid_document(), field: WRONG_VALUES[wrong]}
            yield Case(f"random_{index}_wrong_{field}_{wrong}", _raw(document), "malformed")


#: Any JSON value, nested a little: what a forger may put in any field.
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=24),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _forged(field: str, value: Any, at: int, junk: bytes, how: str) -> bytes:
    document = valid_document("hostile:generated")
    if how == "field":
        document[field] = value
        return _raw(document)
    if how == "cmds":
        document["cmds"] = [[value, "hostile:generated", value]]
        return _raw(document)
    raw = _raw(document)
    at %= len(raw)
    return raw[:at] + junk + raw[at:]


def generated_cases(count: int, reader: Reader) -> list[Case]:
    """``count`` messages drawn by hypothesis (any JSON in a field or a command of a valid op, junk
    bytes spliced into one), each expected to end as ``reader`` (the bridge's settings, in this
    process) refuses it: the bridge across Kafka must say the same. Drawn from a fixed seed
    (``derandomize``); messages the reader accepts are left out."""
    drawn: list[bytes] = []

    @settings(max_examples=count * 4, database=None, derandomize=True, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(sorted(ACCEPTED)), _JSON, st.integers(0, 10_000), st.binary(min_size=1, max_size=6),
           st.sampled_from(("field", "cmds", "splice")))
    def draw(field: str, value: Any, at: int, junk: bytes, how: str) -> None:
        drawn.append(_forged(field, value, at, junk, how))

    draw()
    cases: list[Case] = []
    for raw in drawn:
        try:
            reader.read(raw)
        except DecodeError as exc:
            cases.append(Case(f"generated_{len(cases)}", raw, exc.reason))
        if len(cases) == count:
            break
    return cases


def _random_name(rng: random.Random) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz\r\n |*$"
    while True:
        name = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 12)))
        if name.upper() not in COMMANDS:
            return name


def corpus(random_count: int = 40) -> list[Case]:
    """Every fixed case, then ``random_count`` seeded ones (names are unique)."""
    cases = [
        *truncated_cases(), *nesting_cases(), *size_cases(), *tiny_cases(), *wrong_type_cases(),
        *forbidden_cases(), *crlf_cases(), *key_cases(), *odd_valid_cases(), *unknown_name_cases(),
        *random_cases(random_count),
    ]
    assert len({c.name for c in cases}) == len(cases), "case names must be unique"
    return cases


def signed_corpus(signer: Signer, secret: bytes, random_count: int = 40) -> list[Case]:
    """:func:`corpus` as sent to a signed setup, plus the signature cases."""
    return [*(c.in_signed_setup(signer) for c in corpus(random_count)), *signature_cases(signer, secret)]


def class_of(case: Case) -> str:
    """The class a case belongs to, for summaries: its name without the variant."""
    if case.name.startswith("forbidden_"):
        return "forbidden_" + (case.name.rsplit("_in_", 1)[1] if "_in_" in case.name else "single")
    for prefix in ("truncated", "unterminated", "deep", "over_limit", "tiny", "wrong_inside", "wrong_v",
                   "other_version", "wrong", "crlf_in_command_name", "crlf_in_key", "kafka_key", "odd",
                   "unknown_target", "unknown_script", "signature", "random", "replayed", "generated"):
        if case.name.startswith(prefix):
            return prefix
    return case.name
