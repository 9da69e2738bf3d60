"""Step 1 of the flow: describe a failed Redis write as an immutable :class:`RedisOp`.

The builders here (``ops.set``, ``ops.delete``, ``ops.pipeline``, ``ops.script``...)
check what can be checked without a network: argument types, command names and arity.
They also make time explicit: a relative expiry (``EX``/``PX``, ``EXPIRE``, ``SETEX``...)
is turned into an absolute one (``PXAT``/``PEXPIREAT``) at capture time, so a replay that
runs minutes later never extends a key's life.

Ops are cheap to build (~1 us) because :func:`celery_redis_retry.on_failure` builds one
for every guarded write, failed or not.

Kept whole: this is the module users read (``from celery_redis_retry import ops``): the
op type and every builder, each checking its arguments the same way, in one place.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, Literal

import msgspec

from celery_redis_retry import policy
from celery_redis_retry.errors import EncodeError
from celery_redis_retry.redis_commands import COMMANDS, spec_for

#: A Redis argument as the application gives it. Each type round-trips exactly.
Arg = str | bytes | int | float
#: One command: its name (upper case) followed by its arguments.
Command = tuple[Arg, ...]
Kind = Literal["command", "pipeline", "script"]
#: An op's priority: ``"critical"`` goes ahead of ordinary ops (None) during a drain.
Priority = Literal["critical"]
CRITICAL: Priority = "critical"

EMPTY_CONTEXT: Mapping[str, str] = MappingProxyType({})
_ARG_TYPES = frozenset((str, bytes, int, float))
#: Command name -> where its first key is (every op's Kafka key is read from it).
FIRST_KEY_AT = {name: spec.first_key for name, spec in COMMANDS.items()}


# -- identity ----------------------------------------------------------------------------
# A random 64-bit process prefix plus a counter: unique across processes and hosts, and
# about ten times cheaper than uuid4(). The prefix is redrawn in every forked child, so
# Celery prefork children never share a sequence.

_id_prefix = ""
_id_counter = itertools.count()


def _reseed_ids() -> None:
    global _id_prefix, _id_counter
    _id_prefix = os.urandom(8).hex()
    _id_counter = itertools.count(1)


_reseed_ids()
os.register_at_fork(after_in_child=_reseed_ids)


def new_op_id() -> str:
    """A new op id, unique across processes: 16 hex digits of randomness and a counter."""
    return f"{_id_prefix}-{next(_id_counter):x}"


# -- the model ---------------------------------------------------------------------------


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The first error an op met: what the application saw when its write failed."""

    type: str
    message: str
    #: True when Redis may have applied the write before the error (a timeout or a
    #: connection lost after the command was sent); replays must then be idempotent.
    outcome_unknown: bool = False

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorInfo:
        kind = type(exc)
        return cls(
            type=f"{kind.__module__}.{kind.__qualname__}",
            message=str(exc)[:1000],
            outcome_unknown=policy.outcome_unknown(exc),
        )


class Guard(msgspec.Struct, frozen=True, kw_only=True):
    """A condition checked atomically right before a replay; if it fails, the op is ``superseded``.

    * ``value``: apply only if ``key`` (or hash ``field`` of it) still holds ``expected``,
      the value the application saw before its write (compare-and-set);
    * ``absent``: apply only if ``key`` (or ``field``) does not exist;
    * ``version``: apply only if the number stored at ``key`` (or ``field``) is missing
      or lower than ``version``; the replay then stores ``version`` there, so versions
      only ever grow.
    """

    kind: Literal["value", "absent", "version"]
    key: Arg
    field: Arg | None = None
    expected: Arg | None = None
    version: int | None = None


class RedisOp(msgspec.Struct, frozen=True, kw_only=True):
    """One Redis write to replay: a command, a pipeline or a registered Lua script.

    Immutable: the ``with_*`` methods return changed copies. Build ops with the
    functions of this module rather than by hand; they validate and normalize.
    """

    id: str
    kind: Kind
    #: The commands of a ``command`` (one) or ``pipeline`` (several) op.
    commands: tuple[Command, ...] = ()
    #: Pipelines only: run as MULTI/EXEC.
    transaction: bool = False
    #: Scripts only: the name registered in ``redis_retry_scripts``, its keys and args.
    script: str | None = None
    keys: tuple[Arg, ...] = ()
    args: tuple[Arg, ...] = ()
    target: str = "default"
    #: None: use ``redis_retry_max_retries``.
    max_retries: int | None = None
    created_at: float
    #: Absolute UNIX time after which the op is ``expired`` instead of applied.
    deadline: float | None = None
    context: Mapping[str, str] = EMPTY_CONTEXT
    source: str | None = None
    error: ErrorInfo | None = None
    #: Replays already attempted before this message was written (0 when captured).
    attempt: int = 0
    #: A stale-write guard (see :class:`Guard`), or None.
    guard: Guard | None = None
    #: ``"critical"``: handed to Celery in the critical lane, ahead of ordinary ops (None).
    priority: Priority | None = None

    # -- chainable copies ----------------------------------------------------------------

    def with_context(
        self,
        trace_id: str | None = None,
        user_uuid: str | None = None,
        device_id: str | None = None,
        **extra: object,
    ) -> RedisOp:
        """Copy with context fields added (values are stored as strings)."""
        # Spelled out rather than looped over: a capture path calls this for every op.
        added: dict[str, str] = {}
        if trace_id is not None:
            added["trace_id"] = str(trace_id)
        if user_uuid is not None:
            added["user_uuid"] = str(user_uuid)
        if device_id is not None:
            added["device_id"] = str(device_id)
        for name, value in extra.items():
            if value is not None:
                added[name] = str(value)
        context = {**self.context, **added} if self.context else added
        return msgspec.structs.replace(self, context=MappingProxyType(context))

    def with_source(self, source: str) -> RedisOp:
        """Copy naming the code that issued the write, e.g. ``"UserRepo.delete"``."""
        return msgspec.structs.replace(self, source=str(source))

    def with_max_retries(self, max_retries: int) -> RedisOp:
        """Copy with its own retry budget instead of ``redis_retry_max_retries``."""
        if type(max_retries) is not int or max_retries < 0:
            raise EncodeError(f"max_retries must be an int >= 0, got {max_retries!r}")
        return msgspec.structs.replace(self, max_retries=max_retries)

    def with_target(self, target: str) -> RedisOp:
        """Copy aimed at another entry of ``redis_retry_targets``."""
        if not isinstance(target, str) or not target:
            raise EncodeError(f"target must be a non-empty string, got {target!r}")
        return msgspec.structs.replace(self, target=target)

    def with_priority(self, priority: str | None) -> RedisOp:
        """Copy with a priority: ``"critical"`` replays ahead of ordinary ops, None is ordinary.

        Ops of one key are never reordered: a critical op waits behind an earlier op of its
        key that is still in flight in the ordinary lane (see docs/operations.md, Priorities).
        """
        if priority is not None and priority != CRITICAL:
            raise EncodeError(f"priority must be 'critical' or None, got {priority!r}")
        return msgspec.structs.replace(self, priority=priority)

    def with_error(self, exc: BaseException) -> RedisOp:
        """Copy recording the error the application saw (type, message, outcome unknown)."""
        return msgspec.structs.replace(self, error=ErrorInfo.from_exception(exc))

    def with_deadline(self, seconds: float) -> RedisOp:
        """Copy that ends ``expired`` if not applied within ``seconds`` of its creation."""
        # An infinite deadline would be written as JSON null: silently no deadline.
        finite = isinstance(seconds, (int, float)) and 0 < seconds <= sys.float_info.max
        if isinstance(seconds, bool) or not finite:
            raise EncodeError(f"deadline must be a positive, finite number of seconds, got {seconds!r}")
        return msgspec.structs.replace(self, deadline=self.created_at + seconds)

    # -- stale-write guards --------------------------------------------------------------

    def if_value(self, expected: Arg, *, key: Arg | None = None, field: Arg | None = None) -> RedisOp:
        """Copy replayed only if ``key`` (default: the op's first key), or its hash ``field``,
        still holds ``expected``; otherwise the op ends ``superseded``."""
        return self._guarded("value", key, field, expected=_checked_args([expected], "if_value")[0])

    def if_absent(self, *, key: Arg | None = None, field: Arg | None = None) -> RedisOp:
        """Copy replayed only if ``key`` (default: the op's first key), or its hash ``field``,
        does not exist; otherwise the op ends ``superseded``."""
        return self._guarded("absent", key, field)

    def if_version(self, version: int, *, key: Arg | None = None, field: Arg | None = None) -> RedisOp:
        """Copy replayed only if the version stored at ``key`` (or hash ``field``) is missing or
        lower than ``version``; the replay then stores ``version``. Give ``field`` to keep
        the version in the op's own hash (``field="version"``), or ``key`` for a companion
        key (``key="user:42:version"``)."""
        if type(version) is not int:
            raise EncodeError(f"if_version: version must be an int, got {version!r}")
        if key is None and field is None:
            raise EncodeError("if_version needs field= (a field of the op's hash) or key= (a companion key)")
        return self._guarded("version", key, field, version=version)

    def _guarded(self, kind: Literal["value", "absent", "version"], key: Arg | None, field: Arg | None,
                 **condition: Any) -> RedisOp:
        if self.guard is not None:
            raise EncodeError(f"op {self.id} already has a {self.guard.kind} guard; an op carries one")
        if self.kind == "script":
            raise EncodeError("scripts cannot carry a guard: let the script check its own condition")
        if key is None:
            key = self.first_key
            if key is None:
                raise EncodeError("this op has no key to guard: pass key=")
        key = _checked_args([key], "guard key")[0]
        if field is not None:
            field = _checked_args([field], "guard field")[0]
        return msgspec.structs.replace(self, guard=Guard(kind=kind, key=key, field=field, **condition))

    # -- derived facts -------------------------------------------------------------------

    def all_keys(self) -> list[Arg]:
        """Every Redis key the op touches, in order (for slots and dedupe markers)."""
        if self.kind == "script":
            return list(self.keys)
        found: list[Arg] = []
        for command in self.commands:
            spec = spec_for(str(command[0]))
            found.extend(command[i] for i in spec.key_positions(len(command)))
        return found

    @property
    def first_key(self) -> Arg | None:
        """The first key the op touches: with the target, it orders ops in Kafka."""
        if self.kind == "script":
            return self.keys[0] if self.keys else None
        command = self.commands[0]
        # Names are upper case once built or decoded: a plain lookup is enough here.
        return command[FIRST_KEY_AT[command[0]]]  # type: ignore[index]


# -- validation helpers ------------------------------------------------------------------


def _checked_args(values: Iterable[Any], what: str) -> tuple[Arg, ...]:
    """The arguments as a tuple, refusing what redis-py could not send either."""
    given = tuple(values)
    for value in given:
        kind = type(value)
        if not (kind is str or kind is int or kind is bytes or (kind is float and not math.isnan(value))):
            return _converted_args(given, what)
    return given  # the common case: nothing to convert, no copy


def _converted_args(values: tuple[Any, ...], what: str) -> tuple[Arg, ...]:
    """``values`` with buffers turned into bytes; :class:`EncodeError` naming the first bad one."""
    out: list[Arg] = []
    for value in values:
        kind = type(value)
        if kind in _ARG_TYPES:
            if kind is float and math.isnan(value):
                raise EncodeError(f"{what}: NaN is not a valid Redis argument")
            out.append(value)
        elif kind is bytearray or kind is memoryview:
            out.append(bytes(value))
        else:
            raise EncodeError(
                f"{what}: arguments must be str, bytes, int or float, got {kind.__name__} {value!r:.60}"
            )
    return tuple(out)


def _new(kind: Kind, **fields: Any) -> RedisOp:
    return RedisOp(id=new_op_id(), kind=kind, created_at=time.time(), **fields)


def _command_op(command: Command, now: float) -> RedisOp:
    return RedisOp(id=new_op_id(), kind="command", created_at=now, commands=(command,))


# -- absolute expiries -------------------------------------------------------------------


def _as_int(value: Arg, what: str) -> int:
    try:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise EncodeError(f"{what} must be an integer, got {value!r}") from None


def _set_pxat(flag: str, amount: Arg, now_ms: int) -> Arg:
    """The ``PXAT`` of a SET expiry given as ``flag`` (EX, PX, EXAT or PXAT) and its amount."""
    if flag == "EX":
        return now_ms + _as_int(amount, "SET EX") * 1000
    if flag == "PX":
        return now_ms + _as_int(amount, "SET PX")
    if flag == "EXAT":
        return _as_int(amount, "SET EXAT") * 1000
    return amount


_SET_RELATIVE = frozenset(("EX", "PX", "EXAT"))


def _absolute_expiry(command: Command, now_ms: int) -> Command:
    """Rewrite a relative expiry into an absolute one, so late replays stay true."""
    name = command[0]
    if name == "SET":
        if len(command) < 5:  # no option followed by an amount
            return command
        head, options = command[:3], list(command[3:])
        for i, option in enumerate(options[:-1]):
            # Redis reads flags given as bytes as well: b"EX" must not stay relative.
            word = option.decode("latin-1") if isinstance(option, bytes) else option
            flag = word.upper() if isinstance(word, str) else None
            if flag in _SET_RELATIVE:
                options[i : i + 2] = ["PXAT", _set_pxat(flag, options[i + 1], now_ms)]
        return (*head, *options)
    if name == "SETEX":
        return ("SET", command[1], command[3], "PXAT", now_ms + _as_int(command[2], "SETEX seconds") * 1000)
    if name == "PSETEX":
        return ("SET", command[1], command[3], "PXAT", now_ms + _as_int(command[2], "PSETEX milliseconds"))
    if name == "EXPIRE":
        return ("PEXPIREAT", command[1], now_ms + _as_int(command[2], "EXPIRE seconds") * 1000, *command[3:])
    if name == "PEXPIRE":
        return ("PEXPIREAT", command[1], now_ms + _as_int(command[2], "PEXPIRE milliseconds"), *command[3:])
    if name == "EXPIREAT":
        return ("PEXPIREAT", command[1], _as_int(command[2], "EXPIREAT timestamp") * 1000, *command[3:])
    return command


_RELATIVE_EXPIRY = frozenset(("SET", "SETEX", "PSETEX", "EXPIRE", "PEXPIRE", "EXPIREAT"))


def _build_command(name: str, args: Iterable[Any], now: float) -> Command:
    spec = COMMANDS.get(name) if type(name) is str else None  # the common case: an upper-case name
    if spec is None:
        if not isinstance(name, str):
            raise EncodeError(f"command name must be a str, got {type(name).__name__}")
        spec = spec_for(name)
    command: Command = (spec.name, *_checked_args(args, spec.name))
    if not spec.check_arity(len(command)):
        raise EncodeError(f"wrong number of arguments for {spec.name}: {len(command) - 1}")
    if spec.name in _RELATIVE_EXPIRY:
        command = _absolute_expiry(command, int(now * 1000))
    return command


# -- builders ----------------------------------------------------------------------------


def command(name: str, *args: Any) -> RedisOp:
    """Any allowed write command, e.g. ``command("HINCRBY", "stats", "hits", 1)``.

    Raises :class:`~celery_redis_retry.errors.CommandNotAllowedError` for commands that
    are not replayable writes and :class:`~celery_redis_retry.errors.EncodeError` for bad
    arguments or arity.
    """
    now = time.time()
    return _command_op(_build_command(name, args, now), now)


def set(
    key: Arg,
    value: Arg,
    *,
    ex: int | None = None,
    px: int | None = None,
    exat: int | None = None,
    pxat: int | None = None,
    nx: bool = False,
    xx: bool = False,
    keepttl: bool = False,
    if_value: Arg | None = None,
) -> RedisOp:
    """SET, with redis-py's option names. ``ex``/``px`` become an absolute ``PXAT``.

    ``if_value=old`` guards the replay: it applies only while the key still holds ``old``
    (see :meth:`RedisOp.if_value`).
    """
    # Built straight into its final form (what command("SET", ...) would make of it):
    # services build one of these for every failed write.
    if (ex is not None) + (px is not None) + (exat is not None) + (pxat is not None) + keepttl > 1:
        raise EncodeError("SET takes at most one of ex, px, exat, pxat, keepttl")
    if nx and xx:
        raise EncodeError("SET takes nx or xx, not both")
    now = time.time()
    if ex is None and px is None and exat is None and pxat is None:
        written: Command = ("SET", *_checked_args((key, value), "SET"))
    else:
        flag, amount = (
            ("EX", ex) if ex is not None else ("PX", px) if px is not None
            else ("EXAT", exat) if exat is not None else ("PXAT", pxat)
        )
        checked = _checked_args((key, value, amount), "SET")
        written = ("SET", checked[0], checked[1], "PXAT", _set_pxat(flag, checked[2], int(now * 1000)))
    if nx or xx or keepttl:
        written += (*["NX"] * nx, *["XX"] * xx, *["KEEPTTL"] * keepttl)
    op = _command_op(written, now)
    return op if if_value is None else op.if_value(if_value)


def delete(*keys: Arg) -> RedisOp:
    """DEL of one or more keys."""
    return command("DEL", *keys)


def hset(
    key: Arg,
    field: Arg | Mapping[Arg, Arg] | None = None,
    value: Arg | None = None,
    *,
    mapping: Mapping[Arg, Arg] | None = None,
) -> RedisOp:
    """HSET of ``field, value`` and/or a ``mapping`` (``hset(key, {"a": 1})`` works too)."""
    if isinstance(field, Mapping):
        if mapping is not None:
            raise EncodeError("HSET: pass the mapping once")
        field, mapping = None, field
    pairs: list[Arg] = []
    if field is not None:
        if value is None:
            raise EncodeError("HSET: a field needs a value")
        pairs += [field, value]
    elif value is not None:
        raise EncodeError("HSET: a value needs a field")
    for k, v in (mapping or {}).items():
        pairs += [k, v]
    if not pairs:
        raise EncodeError("HSET needs a field and value or a non-empty mapping")
    return command("HSET", key, *pairs)


def hdel(key: Arg, *fields: Arg) -> RedisOp:
    """HDEL of one or more fields."""
    return command("HDEL", key, *fields)


def sadd(key: Arg, *members: Arg) -> RedisOp:
    """SADD of one or more members."""
    return command("SADD", key, *members)


def srem(key: Arg, *members: Arg) -> RedisOp:
    """SREM of one or more members."""
    return command("SREM", key, *members)


def zadd(
    key: Arg,
    mapping: Mapping[Arg, float],
    *,
    nx: bool = False,
    xx: bool = False,
    gt: bool = False,
    lt: bool = False,
    ch: bool = False,
) -> RedisOp:
    """ZADD of ``{member: score}``, with redis-py's flags (INCR is ``command("ZINCRBY")``)."""
    flags: list[Arg] = [*["NX"] * nx, *["XX"] * xx, *["GT"] * gt, *["LT"] * lt, *["CH"] * ch]
    pairs: list[Arg] = []
    for member, score in mapping.items():
        pairs += [score, member]
    return command("ZADD", key, *flags, *pairs)


def expire(key: Arg, seconds: int, *, nx: bool = False, xx: bool = False, gt: bool = False,
           lt: bool = False) -> RedisOp:
    """EXPIRE, stored as an absolute ``PEXPIREAT`` taken at capture time."""
    flags = ["NX"] * nx + ["XX"] * xx + ["GT"] * gt + ["LT"] * lt
    return command("EXPIRE", key, seconds, *flags)


def incrby(key: Arg, amount: int = 1) -> RedisOp:
    """INCRBY: not idempotent, so it is replayed exactly once through a dedupe marker."""
    return command("INCRBY", key, amount)


def lpush(key: Arg, *values: Arg) -> RedisOp:
    """LPUSH of one or more values (replayed exactly once)."""
    return command("LPUSH", key, *values)


def rpush(key: Arg, *values: Arg) -> RedisOp:
    """RPUSH of one or more values (replayed exactly once)."""
    return command("RPUSH", key, *values)


def pipeline(ops: Iterable[RedisOp], transaction: bool = True) -> RedisOp:
    """Several command ops replayed together; ``transaction=True`` wraps them in MULTI/EXEC.

    The inner ops must be plain commands for one target; the pipeline gets its own id.
    """
    inner = list(ops)
    if not inner:
        raise EncodeError("a pipeline needs at least one op")
    commands: list[Command] = []
    for op in inner:
        if not isinstance(op, RedisOp) or op.kind != "command":
            raise EncodeError(f"pipelines hold command ops only, got {op!r:.80}")
        if op.guard is not None:
            raise EncodeError("guard the pipeline as a whole: ops.pipeline([...]).if_value(...)")
        if op.target != inner[0].target:
            raise EncodeError(f"a pipeline runs on one target, got {inner[0].target!r} and {op.target!r}")
        commands.extend(op.commands)
    return _new("pipeline", commands=tuple(commands), transaction=bool(transaction), target=inner[0].target)


def script(name: str, keys: Iterable[Arg] = (), args: Iterable[Arg] = ()) -> RedisOp:
    """A Lua script registered under ``name`` in ``redis_retry_scripts`` (run by EVALSHA).

    Only the name travels: a message can never carry Lua source of its own.
    """
    if not isinstance(name, str) or not name:
        raise EncodeError(f"script name must be a non-empty str, got {name!r}")
    return _new(
        "script", script=name, keys=_checked_args(keys, f"script {name} keys"),
        args=_checked_args(args, f"script {name} args"),
    )


__all__ = [
    "CRITICAL",
    "EMPTY_CONTEXT",
    "Arg",
    "Command",
    "ErrorInfo",
    "Guard",
    "Priority",
    "RedisOp",
    "command",
    "delete",
    "expire",
    "hdel",
    "hset",
    "incrby",
    "lpush",
    "new_op_id",
    "pipeline",
    "rpush",
    "sadd",
    "script",
    "set",
    "srem",
    "zadd",
]
