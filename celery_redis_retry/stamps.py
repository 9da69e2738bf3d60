"""Write stamps: a replay never overwrites a write made after the one it replays.

Every write a wrapped client sends runs in one Lua step (``write_stamped.lua``) that
also records, next to the key, when the client issued it: microseconds since the epoch
on the client's clock, in a small hash ``crr:{<key>}:w`` (same Redis Cluster slot as the
key). A captured op keeps that issue time as its ``created_at``; its replay is applied
only where no newer write is stamped, and ends ``superseded`` where one is.

What is stamped, per key (the *units*):

* whole-key overwrites (SET, DEL, MSET, RENAME, SETEX...) stamp the key; a replayed
  overwrite is superseded by any newer write to the key;
* writes that build on the value (INCRBY, LPUSH, APPEND, SETBIT...) are superseded
  only by a newer overwrite, so increments made before and during an outage all count;
* field and member writes (HSET, HDEL, SADD, SREM, ZADD, ZREM, HINCRBY, ZINCRBY) stamp
  each field or member, so writes to other fields of the same hash do not supersede
  them; a replay drops the superseded fields and applies the rest;
* TTL writes (EXPIRE family, PERSIST) stamp the key's TTL.

Stamps live as long as an op can still be replayed (``redis_retry_max_age``, or
``redis_retry_dedupe_ttl`` when there is no max age, plus an hour). Pure functions.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from celery_redis_retry.redis_commands import COMMANDS, spec_for
from celery_redis_retry.slots import brace_tag, to_bytes

#: Writes that build on what the key holds: superseded only by a newer overwrite.
BUILDS_ON = frozenset((
    "APPEND", "INCR", "DECR", "INCRBY", "DECRBY", "INCRBYFLOAT", "SETRANGE", "SETBIT", "BITFIELD",
    "LPUSH", "RPUSH", "LPUSHX", "RPUSHX", "LPOP", "RPOP", "LREM", "LSET", "LTRIM", "LINSERT", "LMOVE",
    "RPOPLPUSH", "SPOP", "SMOVE", "ZPOPMIN", "ZPOPMAX", "ZREMRANGEBYSCORE", "ZREMRANGEBYLEX",
    "ZREMRANGEBYRANK", "PFADD", "GEOADD", "XADD", "XDEL", "XTRIM", "HINCRBY", "HINCRBYFLOAT", "ZINCRBY",
))
_TTL_WRITES = frozenset(("EXPIRE", "PEXPIRE", "EXPIREAT", "PEXPIREAT", "PERSIST"))
#: Commands that read some keys and write one: only the destination is stamped.
_DESTINATION_ONLY = {"SINTERSTORE": 1, "SUNIONSTORE": 1, "SDIFFSTORE": 1, "COPY": 2}
_ZADD_FLAGS = frozenset((b"NX", b"XX", b"GT", b"LT", b"CH", b"INCR"))

#: The unit name of a key's TTL (fields are ``.`` + their name, the whole key ``''``).
TTL_UNIT = b"!ttl"

#: Room left in the stamp TTL beyond the replay window, for clocks and late retries.
STAMP_MARGIN_S = 3600


def now_us() -> int:
    """The current stamp: microseconds since the epoch on this host's clock."""
    return time.time_ns() // 1000


def stamp_of(created_at: float) -> int:
    """The stamp of an op issued at ``created_at`` (seconds), as the client computed it."""
    return round(created_at * 1_000_000)


def stamp_key(key: Any) -> bytes:
    """The hash holding ``key``'s write stamps, in ``key``'s Redis Cluster slot."""
    raw = to_bytes(key)
    if raw and b"{" not in raw and b"}" not in raw:
        return b"crr:{" + raw + b"}:w"  # the common case, without repeating the key
    return b"crr:{" + brace_tag(raw) + b"}:w:" + raw


def write_kind(command: Sequence[Any]) -> str:
    """``'='`` for a write that overwrites what it names, ``'+'`` for one that builds on it."""
    name = command[0]
    if name == "ZADD" and any(to_bytes(a).upper() == b"INCR" for a in command[2:] if isinstance(a, (str, bytes))):
        return "+"
    return "+" if name in BUILDS_ON else "="


#: One stamp unit of a command: (position of its key, unit name, first item, item count).
#: ``first`` is the 1-based position in the command of the items the unit covers (0: the
#: whole command stands or falls with it).
Unit = tuple[int, bytes, int, int]


def units(command: Sequence[Any]) -> list[Unit]:
    """What ``command`` writes, as stamp units (see the module documentation)."""
    name = command[0]
    argc = len(command)
    if name in ("HSET", "HMSET"):
        return [(1, b"." + to_bytes(command[i]), i + 1, 2) for i in range(2, argc - 1, 2)]
    if name in ("HDEL", "SADD", "SREM", "ZREM"):
        return [(1, b"." + to_bytes(command[i]), i + 1, 1) for i in range(2, argc)]
    if name in ("HSETNX", "HINCRBY", "HINCRBYFLOAT"):
        return [(1, b"." + to_bytes(command[2]), 0, 0)]
    if name == "ZINCRBY":
        return [(1, b"." + to_bytes(command[3]), 0, 0)]
    if name == "ZADD":
        return _zadd_units(command)
    if name in _TTL_WRITES:
        return [(1, TTL_UNIT, 0, 0)]
    destination = _DESTINATION_ONLY.get(name)
    if destination is not None:
        return [(destination, b"", 0, 0)]
    return [(p, b"", 0, 0) for p in spec_for(name).key_positions(argc)]


def _zadd_units(command: Sequence[Any]) -> list[Unit]:
    at = 2
    while at < len(command) and isinstance(command[at], (str, bytes)) and to_bytes(command[at]).upper() in _ZADD_FLAGS:
        at += 1
    members = range(at + 1, len(command), 2)
    if write_kind(command) == "+":
        return [(1, b"." + to_bytes(command[i]), 0, 0) for i in members]
    return [(1, b"." + to_bytes(command[i]), i, 2) for i in members]


_FIELD_WRITES = frozenset(("HSET", "HMSET", "HDEL", "SADD", "SREM", "ZREM", "HSETNX", "HINCRBY", "HINCRBYFLOAT",
                           "ZINCRBY", "ZADD"))
#: Writes of one key stamped as a whole (most of them): their units and kind need no parsing.
_WHOLE_KEY: dict[str, str] = {
    spec.name: ("+" if spec.name in BUILDS_ON else "=")
    for spec in COMMANDS.values()
    if spec.first_key == spec.last_key == 1
    and spec.name not in _FIELD_WRITES | _TTL_WRITES | _DESTINATION_ONLY.keys()
}


def direct_step(
    command: Sequence[Any], *, stamp: int | None, stamp_ttl: int, marker: bytes | None, marker_ttl: int
) -> tuple[list[Any], list[Any]]:
    """KEYS and ARGV of ``write_stamped.lua`` sending ``command`` (see the script's header).

    ``stamp`` None sends it without stamps; ``marker`` None without a dedupe marker.
    This runs on every wrapped write, so the common shape (one key, stamped whole) is
    built without parsing.
    """
    name = command[0]
    kind = _WHOLE_KEY.get(name)
    if stamp is None:
        keys: list[Any] = list(_data_keys(command))
        argv: list[Any] = ["", stamp_ttl, marker_ttl if marker is not None else 0, kind or "=", 0, *command]
    elif kind is not None:
        key = command[1]
        keys = [stamp_key(key), key]
        argv = [stamp, stamp_ttl, marker_ttl if marker is not None else 0, kind, 1, 1, "", *command]
    else:
        stamp_keys: list[bytes] = []
        unit_args: list[Any] = []
        for position, unit, _, _ in units(command):
            skey = stamp_key(command[position])
            if skey not in stamp_keys:
                stamp_keys.append(skey)
            unit_args += (stamp_keys.index(skey) + 1, unit)
        keys = [*stamp_keys, *_data_keys(command)]
        argv = [stamp, stamp_ttl, marker_ttl if marker is not None else 0, write_kind(command), len(unit_args) // 2,
                *unit_args, *command]
    if marker is not None:
        keys.append(marker)
    return keys, argv


def _data_keys(command: Sequence[Any]) -> list[Any]:
    return [command[p] for p in spec_for(command[0]).key_positions(len(command))]


def ttl_ms(max_age: int, dedupe_ttl: int) -> int:
    """How long stamps live: as long as an op can be replayed, plus :data:`STAMP_MARGIN_S`."""
    return ((max_age or dedupe_ttl) + STAMP_MARGIN_S) * 1000


def step(
    commands: Sequence[Sequence[Any]],
    *,
    mode: str,
    stamp: int | None,
    stamp_ttl: int,
    marker: bytes | None,
    marker_ttl: int,
    guard: Sequence[Any] = ("", "", ""),
    guard_key: Any = None,
) -> tuple[list[Any], list[Any]]:
    """KEYS and ARGV of one ``apply_once.lua`` replay step for ``commands`` (see the script's header).

    ``stamp`` None runs without stamps (neither checked nor written); ``marker`` None
    without a dedupe marker. Every replay builds one: the common shape (one command on
    one key, stamped whole) is built without parsing.
    """
    if stamp is not None and len(commands) == 1:
        command = commands[0]
        kind = _WHOLE_KEY.get(command[0])
        if kind is not None:
            skey = stamp_key(command[1])
            first_key = skey if marker is None else marker
            # One unit, the whole key: its stamp key is KEYS[3], covering the whole command.
            return (
                [first_key, first_key if guard_key is None else guard_key, skey, command[1]],
                [0 if marker is None else marker_ttl, *guard, mode, stamp, stamp_ttl, 1, len(command), kind, 1,
                 3, b"", 0, 0, *command],
            )
    stamp_keys: list[bytes] = []
    index_of: dict[bytes, int] = {}
    data_keys: list[Any] = []
    body: list[Any] = []
    for command in commands:
        command_units = units(command) if stamp is not None else []
        body.extend((len(command), write_kind(command), len(command_units)))
        for position, unit, first, count in command_units:
            skey = stamp_key(command[position])
            index = index_of.get(skey)
            if index is None:
                stamp_keys.append(skey)
                index = index_of[skey] = len(stamp_keys) + 2
            body.extend((index, unit, first, count))
        data_keys.extend(_data_keys(command))
        body.extend(command)
    first_key = marker if marker is not None else (stamp_keys[0] if stamp_keys else _any_key(data_keys))
    keys = [first_key, first_key if guard_key is None else guard_key, *stamp_keys, *data_keys]
    argv = [marker_ttl if marker is not None else 0, *guard, mode, "" if stamp is None else stamp, stamp_ttl,
            len(commands), *body]
    return keys, argv


def _any_key(keys: list[Any]) -> Any:
    # A placeholder in the slot of the op's keys (Redis Cluster routes by KEYS).
    return keys[0] if keys else b"crr:{-}:none"


#: The Lua step a wrapped client sends each write with (see ``write_stamped.lua``).
WRITE_STAMPED = (Path(__file__).parent / "write_stamped.lua").read_text()


WRITE_STAMPED_SHA = hashlib.sha1(WRITE_STAMPED.encode()).hexdigest()  # noqa: S324
