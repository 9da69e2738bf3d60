"""Hypothesis strategies for RedisOp and its parts, shared by the test modules.

Everything is built through the public builders (``ops.set``, ``ops.command``,
``ops.pipeline``...), so a strategy can only produce what an application can. Values stay
inside the limits of wire format v1 (target and names <= 256 characters, texts <= 4096,
<= 64 context entries, max_retries <= 10,000): the builders accept more than the decoder
does, and those limits are tested on their own in test_message.py.

Usage::

    from strategies import ops
    @given(ops())
    def test_something(op): ...

:func:`exact` gives a view of an op in which ``1``, ``1.0`` and ``True``, or ``0.0`` and
``-0.0``, differ: ``==`` on ops cannot tell them apart, and the wire format must.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import msgspec
import redis.exceptions as rex
from hypothesis import strategies as st

from celery_redis_retry import ops as builders
from celery_redis_retry.ops import Arg, RedisOp
from celery_redis_retry.redis_commands import COMMANDS

#: Commands whose expiry the builders rewrite (SETEX -> SET PXAT...): generated with
#: integer amounts where Redis expects them, never with arbitrary arguments.
_EXPIRY_COMMANDS = frozenset(("SET", "SETEX", "PSETEX", "EXPIRE", "PEXPIRE", "EXPIREAT", "PEXPIREAT"))
_PLAIN_COMMANDS = sorted(set(COMMANDS) - _EXPIRY_COMMANDS)

#: Values worth trying every time: edges of 64-bit integers, float oddities, empties.
EDGE_ARGS: tuple[Arg, ...] = (
    "", b"", "\x00", b"\x00", b"\xff\xfe\x80", "é€😀", 0, -1, 2**63 - 1, 2**63, 2**64 - 1, 2**64,
    -(2**63), -(2**63) - 1, 10**40, -(10**40), 0.0, -0.0, 1.0, 0.1, 1e16, 5e-324,
    1.7976931348623157e308, math.inf, -math.inf,
)


def texts(min_size: int = 0, max_size: int = 24) -> st.SearchStrategy[str]:
    """Unicode text without lone surrogates (which cannot be UTF-8 encoded)."""
    return st.text(st.characters(codec="utf-8"), min_size=min_size, max_size=max_size)


@functools.cache
def args() -> st.SearchStrategy[Arg]:
    """One Redis argument: binary (non-UTF-8 too), text, int of any size, float incl. +/-inf, -0.0."""
    return st.one_of(
        st.binary(max_size=24),
        texts(),
        st.integers(),
        st.integers(min_value=-(2**200), max_value=2**200),
        st.floats(allow_nan=False),
        st.sampled_from(EDGE_ARGS),
    )


def _amounts() -> st.SearchStrategy[int]:
    """Expiry amounts: any integer, even beyond 64 bits (absolute times are computed from them)."""
    return st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.integers(0, 10**6))


def _word(word: str) -> st.SearchStrategy[Arg]:
    """A Redis flag as an application may spell it: upper, lower case, or bytes."""
    return st.sampled_from((word, word.lower(), word.encode()))


@st.composite
def _plain_command(draw: st.DrawFn) -> RedisOp:
    spec = COMMANDS[draw(st.sampled_from(_PLAIN_COMMANDS))]
    need = abs(spec.arity) - 1
    count = need if spec.arity > 0 else need + draw(st.integers(0, 4))
    return builders.command(draw(st.sampled_from((spec.name, spec.name.lower()))), *draw(
        st.lists(args(), min_size=count, max_size=count)
    ))


@st.composite
def _set_command(draw: st.DrawFn) -> RedisOp:
    groups: list[list[Arg]] = []  # an option and its amount stay together, in any order of options
    expiry = draw(st.sampled_from((None, "EX", "PX", "EXAT", "PXAT", "KEEPTTL")))
    if expiry == "KEEPTTL":
        groups.append([draw(_word("KEEPTTL"))])
    elif expiry is not None:
        groups.append([draw(_word(expiry)), draw(_amounts())])
    condition = draw(st.sampled_from((None, "NX", "XX")))
    if condition is not None:
        groups.append([draw(_word(condition))])
    if draw(st.booleans()):
        groups.append([draw(_word("GET"))])
    options = [option for group in draw(st.permutations(groups)) for option in group]
    return builders.command("SET", draw(args()), draw(args()), *options)


@st.composite
def _expiry_command(draw: st.DrawFn) -> RedisOp:
    name = draw(st.sampled_from(("SETEX", "PSETEX", "EXPIRE", "PEXPIRE", "EXPIREAT", "PEXPIREAT")))
    if name in ("SETEX", "PSETEX"):
        return builders.command(name, draw(args()), draw(_amounts()), draw(args()))
    flags = draw(st.lists(st.sampled_from(("NX", "XX", "GT", "LT")), max_size=1))
    return builders.command(name, draw(args()), draw(_amounts()), *flags)


@functools.cache
def _helper_command() -> st.SearchStrategy[RedisOp]:
    """The named helpers of ``ops`` with their options."""
    many = st.lists(args(), min_size=1, max_size=4)
    scores = st.floats(allow_nan=False)
    return st.one_of(
        st.builds(
            builders.set, args(), args(),
            ex=st.none() | st.integers(1, 10**9), nx=st.booleans(), keepttl=st.just(False),
        ),
        st.builds(builders.set, args(), args(), px=st.integers(1, 10**12), xx=st.booleans()),
        st.builds(builders.set, args(), args(), exat=_amounts()),
        st.builds(builders.set, args(), args(), pxat=_amounts()),
        st.builds(builders.set, args(), args(), keepttl=st.booleans()),
        many.map(lambda keys: builders.delete(*keys)),
        st.builds(builders.hset, args(), mapping=st.dictionaries(args(), args(), min_size=1, max_size=4)),
        st.builds(builders.hset, args(), args(), args()),
        st.builds(lambda k, f, m: builders.hdel(k, *f, *m), args(), many, st.lists(args(), max_size=2)),
        st.builds(lambda k, m: builders.sadd(k, *m), args(), many),
        st.builds(lambda k, m: builders.srem(k, *m), args(), many),
        st.builds(
            builders.zadd, args(), st.dictionaries(args(), scores, min_size=1, max_size=4),
            nx=st.booleans(), gt=st.booleans(), ch=st.booleans(),
        ),
        st.builds(builders.expire, args(), _amounts(), xx=st.booleans(), lt=st.booleans()),
        st.builds(builders.incrby, args(), st.integers()),
        st.builds(lambda k, v: builders.lpush(k, *v), args(), many),
        st.builds(lambda k, v: builders.rpush(k, *v), args(), many),
    )


@functools.cache
def commands() -> st.SearchStrategy[RedisOp]:
    """Undecorated ``command`` ops: every command of the table, through ``ops.command`` and the helpers."""
    return st.one_of(_plain_command(), _set_command(), _expiry_command(), _helper_command())


@functools.cache
def targets() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(("default", "sessions", "cache")), texts(1, 256))


@st.composite
def pipelines(draw: st.DrawFn) -> RedisOp:
    """``pipeline`` ops of 1-5 commands for one target, with and without MULTI/EXEC."""
    inner = draw(st.lists(commands(), min_size=1, max_size=5))
    if draw(st.booleans()):
        target = draw(targets())
        inner = [op.with_target(target) for op in inner]
    return builders.pipeline(inner, transaction=draw(st.booleans()))


@functools.cache
def scripts() -> st.SearchStrategy[RedisOp]:
    """``script`` ops: a registered name, keys and args (both may be empty)."""
    return st.builds(
        builders.script,
        st.one_of(st.sampled_from(("rate_limit", "cas")), texts(1, 256)),
        keys=st.lists(args(), max_size=4),
        args=st.lists(args(), max_size=4),
    )


_ERRORS: tuple[type[BaseException], ...] = (
    rex.ConnectionError, rex.TimeoutError, rex.ReadOnlyError, rex.BusyLoadingError, rex.ResponseError,
    ConnectionRefusedError, ValueError,
)


@functools.cache
def errors() -> st.SearchStrategy[BaseException]:
    """Exceptions an application may have seen, with any text (longer than the 1000 kept)."""
    return st.builds(lambda kind, text: kind(text), st.sampled_from(_ERRORS), texts(max_size=1200))


# Names with_context takes as its own parameters cannot come through **extra.
_RESERVED = frozenset(("self", "trace_id", "user_uuid", "device_id"))
_CONTEXT_NAMES = texts(1, 256).filter(lambda name: name not in _RESERVED)


@st.composite
def decorate(draw: st.DrawFn, op: RedisOp) -> RedisOp:
    """``op`` with any of the ``with_*`` copies applied (and a replay count, as tasks set it)."""
    if draw(st.booleans()):
        named = {
            name: draw(st.none() | texts(max_size=64)) for name in ("trace_id", "user_uuid", "device_id")
        }
        extra = draw(st.dictionaries(_CONTEXT_NAMES, texts(max_size=4096) | st.integers(), max_size=6))
        op = op.with_context(**named, **extra)
    if draw(st.booleans()):
        op = op.with_source(draw(texts(max_size=4096)))
    if draw(st.booleans()):
        op = op.with_error(draw(errors()))
    if draw(st.booleans()):
        op = op.with_deadline(draw(st.floats(min_value=1e-9, max_value=1e300) | st.integers(1, 10**9)))
    if draw(st.booleans()):
        op = op.with_max_retries(draw(st.integers(0, 10_000)))
    if draw(st.booleans()):
        op = op.with_target(draw(targets()))
    if draw(st.booleans()):
        op = msgspec.structs.replace(op, attempt=draw(st.integers(0, 2**70)))
    return op


@functools.cache
def ops() -> st.SearchStrategy[RedisOp]:
    """Any valid RedisOp: every kind, every builder, every optional field."""
    return st.one_of(commands(), pipelines(), scripts()).flatmap(decorate)


def exact(value: Any) -> Any:
    """A view of ``value`` where types and float signs count: ``exact(op1) == exact(op2)``
    holds only if both carry the same Python types and bit-identical floats."""
    if isinstance(value, msgspec.Struct):
        fields = value.__struct_fields__
        return (type(value).__name__, tuple((f, exact(getattr(value, f))) for f in fields))
    if isinstance(value, Mapping):
        return ("mapping", tuple((exact(k), exact(v)) for k, v in value.items()))
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(exact(v) for v in value))
    return (type(value).__name__, repr(value))


__all__ = [
    "EDGE_ARGS", "args", "commands", "decorate", "errors", "exact", "ops", "pipelines", "scripts", "targets",
    "texts",
]
