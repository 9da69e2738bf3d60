"""What replaying DLQ records would do now, read from the targets without writing to them.

``dlq replay --dry-run`` gives each record one verdict:

* ``would apply``: the replay would write (all of it, or the commands not superseded);
* ``would be superseded``: every write of the op is superseded by a newer write stamped
  on its key, field or TTL (:mod:`celery_redis_retry.stamps`), or its guard no longer
  holds, so the replay would write nothing;
* ``already applied``: the dedupe marker of the op the replay would publish exists (a
  replay of this record ran, and its record was not marked handled);
* ``expired``: past its deadline, ``redis_retry_max_age`` or an absolute expiry it sets
  (:func:`celery_redis_retry.expiry.expired`, the rule the replay tasks apply);
* ``would fail``: the replay would meet an error it cannot get past (a version guard's
  key that holds no number, a guard's key of another type);
* ``refused``: the replay would not publish it (rejected, undecodable, refused by these
  settings: :meth:`DeadLetterQueue.check`);
* ``unknown (target down: <error>)``: its target did not answer.

The stamp and guard rules are those of ``replay/apply_once.lua`` (its ``superseded``
function and guard block), evaluated on the stamps and values read here with GET,
HGET, EXISTS, HEXISTS and HGETALL only: no command run here writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from celery_redis_retry import stamps
from celery_redis_retry.config import Settings
from celery_redis_retry.dlq.admin import DeadLetterQueue, StoredLetter
from celery_redis_retry.expiry import expired
from celery_redis_retry.ops import Command, Guard, RedisOp
from celery_redis_retry.slots import marker_key, to_bytes
from celery_redis_retry.targets import TargetClients

WOULD_APPLY = "would apply"
SUPERSEDED = "would be superseded"
ALREADY_APPLIED = "already applied"
EXPIRED = "expired"
REFUSED = "refused"
UNKNOWN = "unknown"
WOULD_FAIL = "would fail"


def preview(
    settings: Settings, records: Iterable[StoredLetter], *, clients: TargetClients | None = None,
    now: float | None = None,
) -> list[tuple[StoredLetter, str, str]]:
    """``(record, verdict, detail)`` for each record, in order: what a replay would do now."""
    clients = clients if clients is not None else TargetClients(settings.targets)
    records = list(records)
    ready, refused = DeadLetterQueue(settings).check(records)
    verdicts = {id(stored): (REFUSED, why) for stored, why in refused}
    for stored, op, _raw in ready:
        verdicts[id(stored)] = _verdict(settings, clients, op, now)
    return [(stored, *verdicts[id(stored)]) for stored in records]


def _verdict(settings: Settings, clients: TargetClients, op: RedisOp, now: float | None) -> tuple[str, str]:
    why = expired(op, now, max_age=settings.max_age)
    if why is not None:
        return EXPIRED, why
    try:
        return _verdict_on_target(settings, clients.get(op.target), op)
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:  # "unknown", never a crash
        return f"{UNKNOWN} (target down: {exc})", f"target {op.target!r} did not answer"
    except RedisError as exc:  # e.g. WRONGTYPE reading a guard: the replay's reads would meet it too
        return WOULD_FAIL, f"reading its keys: {exc}"


def _verdict_on_target(settings: Settings, client: Any, op: RedisOp) -> tuple[str, str]:
    if op.kind == "script":
        applied = client.exists(marker_key(op)) == 1
        return (ALREADY_APPLIED, f"marker of op {op.id} exists") if applied else (
            WOULD_APPLY, f"script {op.script}: its own checks decide")
    if client.exists(marker_key(op)) == 1:
        return ALREADY_APPLIED, f"marker of op {op.id} exists"
    if op.guard is not None:
        failed = _guard_verdict(client, op.guard)
        if failed is not None:
            return failed
    if not settings.write_stamps:
        return WOULD_APPLY, "write stamps are off"
    stamp = stamps.stamp_of(op.created_at)
    superseded = [c for c in op.commands if _command_superseded(client, c, stamp)]
    if len(superseded) == len(op.commands):
        names = ", ".join(sorted({str(c[0]) for c in superseded}))
        return SUPERSEDED, f"a newer write is stamped on what its {names} writes"
    if superseded:
        applied = len(op.commands) - len(superseded)
        return WOULD_APPLY, f"{applied} of {len(op.commands)} commands (the others superseded)"
    return WOULD_APPLY, "no newer write stamped on its keys"


def _guard_verdict(client: Any, guard: Guard) -> tuple[str, str] | None:
    """The verdict when ``guard`` fails on the target now (apply_once.lua's guard block), or None if it holds."""
    key, field = guard.key, guard.field
    if guard.kind == "absent":
        present = client.exists(key) if field is None else client.hexists(key, field)
        return (SUPERSEDED, f"guard: {_name(key, field)} exists") if present else None
    current = client.get(key) if field is None else client.hget(key, field)
    if guard.kind == "value":
        expected = None if guard.expected is None else to_bytes(guard.expected)
        return None if current == expected else (SUPERSEDED, f"guard: {_name(key, field)} no longer holds "
                                                             f"{guard.expected!r}")
    if current is None or guard.version is None:
        return None
    try:
        stored = float(current)
    except ValueError:
        return WOULD_FAIL, f"version guard: {_name(key, field)} does not hold a number"
    if stored >= guard.version:
        return SUPERSEDED, f"guard: {_name(key, field)} holds version {current.decode()}, not below {guard.version}"
    return None


def _command_superseded(client: Any, command: Command, stamp: int) -> bool:
    """Whether apply_once.lua would skip all of ``command``: a whole unit or every partial unit superseded."""
    kind = stamps.write_kind(command)
    units = stamps.units(command)
    seen: dict[bytes, Mapping[bytes, bytes]] = {}
    partial_left = False
    for position, unit, first, _count in units:
        key = stamps.stamp_key(command[position])
        if key not in seen:
            seen[key] = client.hgetall(key)
        if _unit_superseded(seen[key], unit, kind, stamp):
            if first == 0:
                return True
        elif first != 0:
            partial_left = True
    return bool(units) and units[0][2] != 0 and not partial_left


def _unit_superseded(stamps_of_key: Mapping[bytes, bytes], unit: bytes, kind: str, stamp: int) -> bool:
    """apply_once.lua's ``superseded``: an overwrite by any newer write, a build-on by a newer overwrite."""
    def newer(name: bytes) -> bool:
        seen = stamps_of_key.get(name)
        return seen is not None and int(seen) > stamp

    if unit and newer(b"="):
        return True
    return newer(b"+" + unit) if kind == "=" else newer(b"=" + unit)


def _name(key: Any, field: Any) -> str:
    name = to_bytes(key).decode(errors="replace")
    return name if field is None else f"{name}[{to_bytes(field).decode(errors='replace')}]"
