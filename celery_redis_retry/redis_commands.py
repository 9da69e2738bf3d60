"""What celery_redis_retry knows about each Redis write command it may replay.

The table below is the single source for three decisions taken along the flow:

* **which arguments are keys** (message key and partition, Redis Cluster slot checks,
  the dedupe marker's hash tag), from Redis' own ``COMMAND INFO`` (arity, first key,
  last key, step) as reported by Redis 7.0;
* **whether replaying it twice changes the result** (``idempotent``): commands such as
  INCRBY, LPUSH or APPEND are not, so their replays run through an atomic dedupe step;
* **which commands may be replayed at all**: only writes listed here can be allowed by
  ``redis_retry_allowed_commands``. Reads are never captured (nothing to retry), and
  administrative commands (FLUSHALL, CONFIG, EVAL with inline source...) are absent on
  purpose, so a forged message can never run them.

Commands with *movable* keys (ZUNIONSTORE...) are left out: their keys cannot be found
from a fixed position, so slot checks and dedupe markers could not be trusted.
"""

from __future__ import annotations

from typing import NamedTuple

from celery_redis_retry.errors import CommandNotAllowedError


class CommandSpec(NamedTuple):
    """One row of the command table (names and key positions as ``COMMAND INFO``)."""

    name: str
    arity: int  # exact argument count including the name; negative means "at least"
    first_key: int
    last_key: int  # -1: the last argument
    key_step: int
    idempotent: bool

    def check_arity(self, argc: int) -> bool:
        """True when ``argc`` (name included) fits this command's arity."""
        return argc == self.arity if self.arity > 0 else argc >= -self.arity

    def key_positions(self, argc: int) -> range:
        """Positions of the key arguments in a command of ``argc`` items."""
        last = self.last_key if self.last_key >= 0 else argc + self.last_key
        return range(self.first_key, last + 1, self.key_step)


def _spec(name: str, arity: int, first: int, last: int, step: int, *, idempotent: bool) -> CommandSpec:
    return CommandSpec(name, arity, first, last, step, idempotent)


_I, _N = True, False  # idempotent / not: keeps the table below readable

COMMANDS: dict[str, CommandSpec] = {
    spec.name: spec
    for spec in (
        # strings
        _spec("SET", -3, 1, 1, 1, idempotent=_I),
        _spec("SETNX", 3, 1, 1, 1, idempotent=_I),
        _spec("SETEX", 4, 1, 1, 1, idempotent=_I),
        _spec("PSETEX", 4, 1, 1, 1, idempotent=_I),
        _spec("MSET", -3, 1, -1, 2, idempotent=_I),
        _spec("MSETNX", -3, 1, -1, 2, idempotent=_I),
        _spec("SETRANGE", 4, 1, 1, 1, idempotent=_I),
        _spec("GETSET", 3, 1, 1, 1, idempotent=_I),
        _spec("GETDEL", 2, 1, 1, 1, idempotent=_I),
        _spec("APPEND", 3, 1, 1, 1, idempotent=_N),
        _spec("INCR", 2, 1, 1, 1, idempotent=_N),
        _spec("DECR", 2, 1, 1, 1, idempotent=_N),
        _spec("INCRBY", 3, 1, 1, 1, idempotent=_N),
        _spec("DECRBY", 3, 1, 1, 1, idempotent=_N),
        _spec("INCRBYFLOAT", 3, 1, 1, 1, idempotent=_N),
        _spec("SETBIT", 4, 1, 1, 1, idempotent=_I),
        # BITFIELD may carry INCRBY sub-commands.
        _spec("BITFIELD", -2, 1, 1, 1, idempotent=_N),
        # keys
        _spec("DEL", -2, 1, -1, 1, idempotent=_I),
        _spec("UNLINK", -2, 1, -1, 1, idempotent=_I),
        _spec("EXPIRE", -3, 1, 1, 1, idempotent=_I),
        _spec("PEXPIRE", -3, 1, 1, 1, idempotent=_I),
        _spec("EXPIREAT", -3, 1, 1, 1, idempotent=_I),
        _spec("PEXPIREAT", -3, 1, 1, 1, idempotent=_I),
        _spec("PERSIST", 2, 1, 1, 1, idempotent=_I),
        _spec("COPY", -3, 1, 2, 1, idempotent=_I),
        # A second RENAME fails with "no such key": only the first may run.
        _spec("RENAME", 3, 1, 2, 1, idempotent=_N),
        _spec("RENAMENX", 3, 1, 2, 1, idempotent=_N),
        # hashes
        _spec("HSET", -4, 1, 1, 1, idempotent=_I),
        _spec("HMSET", -4, 1, 1, 1, idempotent=_I),
        _spec("HSETNX", 4, 1, 1, 1, idempotent=_I),
        _spec("HDEL", -3, 1, 1, 1, idempotent=_I),
        _spec("HINCRBY", 4, 1, 1, 1, idempotent=_N),
        _spec("HINCRBYFLOAT", 4, 1, 1, 1, idempotent=_N),
        # sets
        _spec("SADD", -3, 1, 1, 1, idempotent=_I),
        _spec("SREM", -3, 1, 1, 1, idempotent=_I),
        _spec("SMOVE", 4, 1, 2, 1, idempotent=_I),
        _spec("SPOP", -2, 1, 1, 1, idempotent=_N),
        _spec("SINTERSTORE", -3, 1, -1, 1, idempotent=_I),
        _spec("SUNIONSTORE", -3, 1, -1, 1, idempotent=_I),
        _spec("SDIFFSTORE", -3, 1, -1, 1, idempotent=_I),
        # sorted sets (ZADD with INCR is caught by is_idempotent below)
        _spec("ZADD", -4, 1, 1, 1, idempotent=_I),
        _spec("ZREM", -3, 1, 1, 1, idempotent=_I),
        _spec("ZINCRBY", 4, 1, 1, 1, idempotent=_N),
        _spec("ZREMRANGEBYSCORE", 4, 1, 1, 1, idempotent=_I),
        _spec("ZREMRANGEBYLEX", 4, 1, 1, 1, idempotent=_I),
        # Ranks shift after the first removal, so a second run removes more.
        _spec("ZREMRANGEBYRANK", 4, 1, 1, 1, idempotent=_N),
        _spec("ZPOPMIN", -2, 1, 1, 1, idempotent=_N),
        _spec("ZPOPMAX", -2, 1, 1, 1, idempotent=_N),
        # lists
        _spec("LPUSH", -3, 1, 1, 1, idempotent=_N),
        _spec("RPUSH", -3, 1, 1, 1, idempotent=_N),
        _spec("LPUSHX", -3, 1, 1, 1, idempotent=_N),
        _spec("RPUSHX", -3, 1, 1, 1, idempotent=_N),
        _spec("LPOP", -2, 1, 1, 1, idempotent=_N),
        _spec("RPOP", -2, 1, 1, 1, idempotent=_N),
        _spec("LREM", 4, 1, 1, 1, idempotent=_N),
        _spec("LSET", 4, 1, 1, 1, idempotent=_I),
        _spec("LTRIM", 4, 1, 1, 1, idempotent=_N),
        _spec("LINSERT", 5, 1, 1, 1, idempotent=_N),
        _spec("LMOVE", 5, 1, 2, 1, idempotent=_N),
        _spec("RPOPLPUSH", 3, 1, 2, 1, idempotent=_N),
        # other types
        _spec("PFADD", -2, 1, 1, 1, idempotent=_I),
        _spec("GEOADD", -5, 1, 1, 1, idempotent=_I),
        _spec("XADD", -5, 1, 1, 1, idempotent=_N),
        _spec("XDEL", -3, 1, 1, 1, idempotent=_I),
        _spec("XTRIM", -4, 1, 1, 1, idempotent=_I),
    )
}

#: Allowed when ``redis_retry_allowed_commands`` is not set: every write in the table.
DEFAULT_ALLOWED: frozenset[str] = frozenset(COMMANDS)


def spec_for(name: str) -> CommandSpec:
    """The table row for ``name`` (any case); :class:`CommandNotAllowedError` if unknown."""
    spec = COMMANDS.get(name.upper())
    if spec is None:
        raise CommandNotAllowedError(
            f"{name!r} is not a Redis write command celery_redis_retry can replay "
            f"(reads are never captured; admin commands are never allowed)"
        )
    return spec


def is_idempotent(command: tuple[object, ...]) -> bool:
    """True when running ``command`` twice leaves Redis as running it once would."""
    spec = COMMANDS.get(command[0]) or COMMANDS[str(command[0]).upper()]  # type: ignore[call-overload]
    if spec.name == "ZADD":
        # Flags may be bytes, as redis-py sends them; a member named "incr" only costs a dedupe.
        return not any(isinstance(a, (str, bytes)) and a.upper() in ("INCR", b"INCR") for a in command[2:])
    return spec.idempotent


#: Lua's unpack() stops near 8,000 values: larger commands cannot take the Lua path.
LUA_MAX_ARGS = 7_900
