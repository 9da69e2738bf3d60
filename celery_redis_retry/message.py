"""Step 2 of the flow: the one wire format, used in Kafka, in Celery tasks and in the spool.

A message is one JSON object, UTF-8, versioned with ``"v": 1``. Arguments keep their
Python type: JSON strings are ``str``, JSON numbers are ``int`` (any size) or ``float``,
and two tagged objects carry what JSON cannot: ``{"b": "<base64>"}`` for ``bytes`` and
``{"f": "inf"}`` / ``{"f": "-inf"}`` for infinite floats. See ``docs/wire-format.md``.

Signing: with ``redis_retry_signing_keys`` set, the encoder appends a last member
``"sig": {"kid": ..., "mac": ...}`` whose ``mac`` is the hex HMAC-SHA256 of the message
*without* that member (the canonical bytes: everything before ``,"sig":`` followed by
``}``). Verification therefore needs no parsing and runs before it, in constant time.

Reading is defensive: the size is checked before any parsing, the schema bounds the
nesting, every list and string has a length limit, and anything wrong raises
:class:`~celery_redis_retry.errors.DecodeError` naming the field. :class:`Reader` is
the one way an op is read back (the bridge, the workers, the DLQ records): decode,
verify, check against the settings.

Kept whole: the format, its signature and its reader are one contract; a change to one
is a change to the others, read here together.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
import orjson

from celery_redis_retry.errors import (
    CommandNotAllowedError,
    CrossSlotError,
    CrossSlotMessageError,
    DecodeError,
    EncodeError,
    SignatureError,
    UnsupportedVersionError,
)
from celery_redis_retry.ops import EMPTY_CONTEXT, FIRST_KEY_AT, Arg, Command, ErrorInfo, Guard, RedisOp
from celery_redis_retry.redis_commands import COMMANDS, spec_for

if TYPE_CHECKING:  # config imports this module: the settings are only a type here
    from celery_redis_retry.config import Settings

VERSION = 1

#: Hard limits of the format, whatever the settings say. Messages above
#: ``redis_retry_max_message_bytes`` (default 1 MB, Kafka's default) never get parsed.
MAX_COMMANDS = 10_000  # commands in one pipeline
MAX_ARGS = 100_000  # arguments in one command, or keys/args of a script
MAX_NAME = 256  # ids, targets, script names, context keys
MAX_TEXT = 4096  # context values, source, error messages
MAX_TIME = 2**53 // 1_000_000  # created_at, in seconds (the year 2255): its stamp in microseconds stays exact

# -- schema (what the decoder accepts) ---------------------------------------------------


class _Tagged(msgspec.Struct, forbid_unknown_fields=True):
    """An argument JSON cannot carry natively: bytes (``b``) or an infinite float (``f``)."""

    b: str | None = None
    f: Literal["inf", "-inf"] | None = None


_WireArg = int | float | str | _Tagged
_WireArgs = Annotated[list[_WireArg], msgspec.Meta(max_length=MAX_ARGS)]
_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME)]
_Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]


class _WireError(msgspec.Struct, forbid_unknown_fields=True):
    type: _Text
    message: _Text
    outcome_unknown: bool = False


class _WireGuard(msgspec.Struct, forbid_unknown_fields=True):
    kind: Literal["value", "absent", "version"]
    key: _WireArg
    field: _WireArg | None = None
    expected: _WireArg | None = None
    version: int | None = None


class _WireSig(msgspec.Struct, forbid_unknown_fields=True):
    kid: _Name
    mac: str


class _WireOp(msgspec.Struct, forbid_unknown_fields=True):
    v: int
    id: _Name
    kind: Literal["command", "pipeline", "script"]
    created_at: float
    target: _Name = "default"
    cmds: Annotated[
        list[Annotated[list[_WireArg], msgspec.Meta(min_length=1, max_length=MAX_ARGS)]],
        msgspec.Meta(max_length=MAX_COMMANDS),
    ] = msgspec.field(default_factory=list)
    tx: bool = False
    script: _Name | None = None
    keys: _WireArgs = msgspec.field(default_factory=list)
    args: _WireArgs = msgspec.field(default_factory=list)
    attempt: Annotated[int, msgspec.Meta(ge=0)] = 0
    max_retries: Annotated[int, msgspec.Meta(ge=0, le=10_000)] | None = None
    deadline: float | None = None
    ctx: Annotated[dict[_Name, _Text], msgspec.Meta(max_length=64)] = msgspec.field(default_factory=dict)
    source: _Text | None = None
    error: _WireError | None = None
    guard: _WireGuard | None = None
    priority: Literal["critical"] | None = None
    sig: _WireSig | None = None


class _VersionOnly(msgspec.Struct):
    v: Any = msgspec.UNSET


_decoder = msgspec.json.Decoder(_WireOp)
_fallback_encoder = msgspec.json.Encoder()

# -- encoding ----------------------------------------------------------------------------

_NON_FINITE = {math.inf: "inf", -math.inf: "-inf"}


def _wire_arg(value: Arg) -> Any:
    if type(value) is bytes:
        return {"b": base64.b64encode(value).decode("ascii")}
    if type(value) is float and value in _NON_FINITE:
        return {"f": _NON_FINITE[value]}
    return value


def _wire_args(values: tuple[Arg, ...]) -> Any:
    # Most commands carry only str and int: hand the tuple over untouched.
    for value in values:
        kind = type(value)
        if kind is not str and (kind is bytes or (kind is float and value in _NON_FINITE)):
            return [_wire_arg(v) for v in values]
    return values


def _all_finite(values: tuple[Arg | None, ...]) -> bool:
    """Whether no value is an infinite float. A loop on types, not a set lookup: that would
    hash every argument, a cost that grows with the size of the values."""
    for value in values:  # noqa: SIM110 - all() over a generator costs more per op
        if type(value) is float and value in _NON_FINITE:
            return False
    return True


def _untagged_document(op: RedisOp) -> tuple[dict[str, Any], bool]:
    """The op's wire document with its arguments and guard values as they are (not tagged
    yet), and whether none of them is an infinite float (those must be tagged before orjson
    sees them: it would write them as ``null``)."""
    kind = op.kind
    # One dict literal per kind: every published op is encoded from here.
    if kind == "command":
        doc: dict[str, Any] = {
            "v": VERSION, "id": op.id, "kind": kind, "created_at": op.created_at, "target": op.target,
            "cmds": op.commands,
        }
        finite = _all_finite(op.commands[0])
    elif kind == "pipeline":
        doc = {
            "v": VERSION, "id": op.id, "kind": kind, "created_at": op.created_at, "target": op.target,
            "cmds": op.commands, "tx": op.transaction,
        }
        finite = all(_all_finite(command) for command in op.commands)
    else:
        doc = {
            "v": VERSION, "id": op.id, "kind": kind, "created_at": op.created_at, "target": op.target,
            "script": op.script, "keys": op.keys, "args": op.args,
        }
        finite = _all_finite(op.keys) and _all_finite(op.args)
    if op.attempt:
        doc["attempt"] = op.attempt
    if op.max_retries is not None:
        doc["max_retries"] = op.max_retries
    if op.deadline is not None:
        doc["deadline"] = op.deadline
    if op.context:
        doc["ctx"] = op.context.copy()  # type: ignore[attr-defined]  # a MappingProxyType: fast
    if op.source is not None:
        doc["source"] = op.source
    if op.error is not None:
        error = op.error
        doc["error"] = {"type": error.type, "message": error.message, "outcome_unknown": error.outcome_unknown}
    if op.guard is not None:
        guard = op.guard
        doc["guard"] = {
            "kind": guard.kind,
            "key": guard.key,
            **({"field": guard.field} if guard.field is not None else {}),
            **({"expected": guard.expected} if guard.expected is not None else {}),
            **({"version": guard.version} if guard.version is not None else {}),
        }
        finite = finite and _all_finite((guard.key, guard.field, guard.expected))
    if op.priority is not None:
        doc["priority"] = op.priority
    return doc, finite


def op_document(op: RedisOp) -> dict[str, Any]:
    """The op as the JSON-ready dict of wire format v1 (also embedded in DLQ records)."""
    doc, _ = _untagged_document(op)
    if op.kind == "script":
        doc["keys"] = _wire_args(op.keys)
        doc["args"] = _wire_args(op.args)
    else:
        doc["cmds"] = [_wire_args(c) for c in op.commands]
    if op.guard is not None:
        doc["guard"] = {name: _wire_arg(value) for name, value in doc["guard"].items()}
    return doc


def dumps(document: Any) -> bytes:
    """JSON bytes of a document; :class:`EncodeError` if it cannot be encoded."""
    try:
        return orjson.dumps(document)
    except orjson.JSONEncodeError as first:
        # orjson stops at 64-bit integers; msgspec writes integers of any size.
        try:
            return _fallback_encoder.encode(document)
        except Exception as exc:
            raise EncodeError(f"op cannot be encoded: {first}") from exc


def message_key(op: RedisOp) -> bytes:
    """The Kafka message key: target and first Redis key, so one key's ops share a partition."""
    if op.kind != "script":  # RedisOp.first_key without a property call: every published op needs it
        command = op.commands[0]
        key: Arg | None = command[FIRST_KEY_AT[command[0]]]  # type: ignore[index]
    else:
        key = op.keys[0] if op.keys else None
    if type(key) is bytes:
        return op.target.encode() + b"\x00" + key
    if type(key) is str:
        try:
            return f"{op.target}\x00{key}".encode()  # most keys: valid UTF-8 text
        except UnicodeEncodeError:
            pass  # a lone surrogate: written as it is, below
    return f"{op.target}\x00{key!s}".encode(errors="surrogatepass")


def encode(op: RedisOp, signer: Signer | None = None) -> bytes:
    """The wire bytes of ``op``, signed when a :class:`Signer` is given.

    The bytes of ``dumps(op_document(op))``, written in one pass for most ops: orjson
    calls :func:`_tag_bytes` for each ``bytes`` value and so tags it where
    :func:`op_document` would. It would write an infinite float as ``null``, though, and
    stops at integers beyond 64 bits: ops with those are written from :func:`op_document`.
    """
    try:
        doc, finite = _untagged_document(op)
        raw = orjson.dumps(doc, default=_tag_bytes) if finite else None
    except TypeError:  # orjson.JSONEncodeError is one: an integer beyond 64 bits, say
        raw = None
    if raw is None:
        raw = dumps(op_document(op))
    return signer.sign(raw) if signer is not None else raw


def _tag_bytes(value: Any) -> Any:
    """orjson's hook for what it cannot write itself: ``bytes``, tagged as in :func:`op_document`."""
    if type(value) is bytes:
        return {"b": base64.b64encode(value).decode("ascii")}
    raise TypeError(f"{type(value).__name__} is not a wire argument")


# -- decoding ----------------------------------------------------------------------------


def _arg(value: Any, where: str) -> Arg:
    if type(value) is _Tagged:
        if value.b is not None and value.f is None:
            try:
                return base64.b64decode(value.b, validate=True)
            except (binascii.Error, ValueError):
                raise DecodeError(f"invalid base64 in bytes argument at {where}") from None
        if value.f is not None and value.b is None:
            return math.inf if value.f == "inf" else -math.inf
        raise DecodeError(f"a tagged argument needs exactly one of 'b' or 'f' at {where}")
    return value  # type: ignore[no-any-return]


def _args(values: list[Any], where: str) -> tuple[Arg, ...]:
    for value in values:
        if type(value) is _Tagged:
            return tuple(_arg(v, f"{where}[{i}]") for i, v in enumerate(values))
    return tuple(values)


def _command(values: list[Any], index: int) -> Command:
    name = values[0]
    where = f"$.cmds[{index}]"
    if not isinstance(name, str):
        raise DecodeError(f"command name must be a string at {where}[0]")
    spec = COMMANDS.get(name)  # the common case: already upper case
    if spec is None:
        try:
            spec = spec_for(name)
        except CommandNotAllowedError as exc:
            raise CommandNotAllowedError(f"{exc} (at {where}[0])") from None
    if not spec.check_arity(len(values)):
        raise DecodeError(f"wrong number of arguments for {spec.name} at {where}")
    command = _args(values, where)
    return command if name == spec.name else (spec.name, *command[1:])


def _commands(wire: list[list[Any]]) -> tuple[Command, ...]:
    if len(wire) == 1:  # one command: most ops
        return (_command(wire[0], 0),)
    return tuple([_command(c, i) for i, c in enumerate(wire)])


def _check_shape(wire: _WireOp) -> None:
    if wire.kind == "script":
        if wire.script is None or wire.cmds:
            raise DecodeError("a script op needs 'script' and no 'cmds'")
    else:
        if wire.script is not None or wire.keys or wire.args:
            raise DecodeError(f"a {wire.kind} op carries 'cmds', not 'script', 'keys' or 'args'")
        if wire.tx and wire.kind != "pipeline":
            raise DecodeError("only a pipeline op can carry 'tx'")
        if not wire.cmds or (wire.kind == "command" and len(wire.cmds) != 1):
            raise DecodeError(f"a {wire.kind} op needs {'one command' if wire.kind == 'command' else 'commands'}")
    if not math.isfinite(wire.created_at) or (wire.deadline is not None and not math.isfinite(wire.deadline)):
        raise DecodeError("created_at and deadline must be finite numbers")
    if not -MAX_TIME <= wire.created_at <= MAX_TIME:  # its write stamp, in microseconds, must be exact
        raise DecodeError(f"created_at {wire.created_at!r} is outside +-{MAX_TIME:.0f} seconds")


def _version_error(raw: bytes) -> DecodeError | None:
    try:
        version = msgspec.json.decode(raw, type=_VersionOnly).v
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError):
        # Unlike the typed schema, ``Any`` and skipped unknown fields are parsed
        # recursively: msgspec raises RecursionError on deep nesting there.
        return None
    if version is not msgspec.UNSET and version != VERSION:
        return UnsupportedVersionError(f"wire format version {version!r} is not supported (this reads v{VERSION})")
    return None


def decode(raw: bytes, *, max_bytes: int = 1_000_000, signer: Signer | None = None) -> RedisOp:
    """The :class:`RedisOp` in ``raw``, after size, signature and schema checks.

    Raises :class:`DecodeError` (or its subclasses :class:`SignatureError`,
    :class:`UnsupportedVersionError`, and :class:`CommandNotAllowedError` for commands
    that are not replayable writes) naming what is wrong; never anything else.
    """
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise DecodeError(f"message must be bytes, got {type(raw).__name__}")
    raw = bytes(raw)
    if len(raw) > max_bytes:
        raise DecodeError(f"message is {len(raw)} bytes, over the {max_bytes}-byte limit")
    if signer is not None:
        signer.verify(raw)
    try:
        wire = _decoder.decode(raw)
    # msgspec reports invalid UTF-8 inside a JSON string as UnicodeDecodeError.
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise (_version_error(raw) or DecodeError(f"invalid message: {exc}")) from None
    if wire.v != VERSION:
        raise UnsupportedVersionError(f"wire format version {wire.v} is not supported (this reads v{VERSION})")
    _check_shape(wire)
    error = wire.error
    return RedisOp(
        id=wire.id,
        kind=wire.kind,
        commands=_commands(wire.cmds) if wire.cmds else (),
        transaction=wire.tx,
        script=wire.script,
        keys=_args(wire.keys, "$.keys") if wire.keys else (),
        args=_args(wire.args, "$.args") if wire.args else (),
        target=wire.target,
        max_retries=wire.max_retries,
        created_at=wire.created_at,
        deadline=wire.deadline,
        context=MappingProxyType(wire.ctx) if wire.ctx else EMPTY_CONTEXT,
        source=wire.source,
        error=None if error is None else ErrorInfo(
            type=error.type, message=error.message, outcome_unknown=error.outcome_unknown
        ),
        attempt=wire.attempt,
        guard=None if wire.guard is None else _guard(wire.guard),
        priority=wire.priority,
    )


_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")


_SIG_TAIL = re.compile(rb',"sig":\{"kid":"([A-Za-z0-9._-]{1,64})","mac":"([0-9a-f]{64})"\}\}\Z')


class Signer:
    """HMAC-SHA256 signing and verification with a set of keys (key id -> secret).

    The first key signs; every key verifies, so a key can be rotated by putting the
    new one first and removing the old one once no message signed with it remains.
    """

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        if not keys:
            raise ValueError("a Signer needs at least one key")
        for key_id in keys:
            if not _KEY_ID.match(key_id):
                raise ValueError(f"signing key id {key_id!r} must match [A-Za-z0-9._-]{{1,64}}")
        self._keys = dict(keys)
        self.key_id = next(iter(self._keys))

    def _mac(self, key_id: str, canonical: bytes) -> bytes:
        return hmac.new(self._keys[key_id], canonical, hashlib.sha256).hexdigest().encode("ascii")

    def sign(self, raw: bytes) -> bytes:
        """``raw`` (an unsigned message) with its signature appended as the last member."""
        mac = self._mac(self.key_id, raw)
        return b"%s,\"sig\":{\"kid\":\"%s\",\"mac\":\"%s\"}}" % (raw[:-1], self.key_id.encode(), mac)

    def verify(self, raw: bytes) -> None:
        """Check the signature of ``raw``; :class:`SignatureError` unless it is valid."""
        start = raw.rfind(b',"sig":{')
        tail = _SIG_TAIL.match(raw, start) if start > 0 else None
        if tail is None:
            raise SignatureError("message is not signed (signing keys are configured)")
        key_id = tail.group(1).decode("ascii")
        if key_id not in self._keys:
            raise SignatureError(f"message is signed with unknown key id {key_id!r}")
        expected = self._mac(key_id, raw[:start] + b"}")
        if not hmac.compare_digest(expected, tail.group(2)):
            raise SignatureError(f"bad signature (key id {key_id!r})")


class Reader:
    """The one way an op is read back from its wire bytes: the bridge, the worker and the DLQ all use it.

    :meth:`read` decodes (size, signature, schema) and checks the op against the
    settings (target, allowed commands, scripts, cluster slots), raising the one
    :class:`DecodeError` that names the reason. Build one per settings and keep it: it
    holds the :class:`Signer`.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.signer = settings.signer
        self.max_bytes = settings.max_message_bytes

    def read(self, raw: bytes | str) -> RedisOp:
        """The op in ``raw`` if these settings would replay it; else :class:`DecodeError` naming why."""
        # decode() inlined, not decoded(): the bridge reads ~20k ops/s through here.
        op = decode(raw.encode() if isinstance(raw, str) else raw, max_bytes=self.max_bytes, signer=self.signer)
        try:
            self.settings.check_op(op)
        except CrossSlotError as exc:  # its other refusals are DecodeErrors already
            raise CrossSlotMessageError(str(exc)) from None
        return op

    def decoded(self, raw: bytes | str) -> RedisOp:
        """The op in ``raw`` (size, signature and schema checked), whatever the settings allow."""
        # Celery task arguments carry the message as text.
        data = raw.encode() if isinstance(raw, str) else raw
        return decode(data, max_bytes=self.max_bytes, signer=self.signer)

    def body(self, raw: bytes | str) -> RedisOp | None:
        """The op a DLQ record keeps for ``raw``: the decoded op, or None if it does not decode."""
        try:
            return self.decoded(raw)
        except DecodeError:
            return None


def _guard(wire: _WireGuard) -> Guard:
    needs = {"value": ("expected",), "version": ("version",), "absent": ()}[wire.kind]
    for name in ("expected", "version"):
        if (getattr(wire, name) is not None) != (name in needs):
            raise DecodeError(f"a {wire.kind} guard {'needs' if name in needs else 'takes no'} '{name}' at $.guard")
    return Guard(
        kind=wire.kind,
        key=_arg(wire.key, "$.guard.key"),
        field=None if wire.field is None else _arg(wire.field, "$.guard.field"),
        expected=None if wire.expected is None else _arg(wire.expected, "$.guard.expected"),
        version=wire.version,
    )

__all__ = [
    "MAX_ARGS", "MAX_COMMANDS", "VERSION", "Reader", "Signer", "decode", "dumps", "encode", "message_key",
    "op_document",
]
