"""Which DLQ records an operator means: :class:`DlqFilter`, shared by ``dlq list|replay|purge``.

The criteria combine (a record must meet every one given): the record's reason and
outcome, a command of its op, its target, a key glob, its age, op ids, and whether it
is itself a replay. :meth:`DlqFilter.from_options` builds one from what a command line
(or a web form) gives, and refuses bad input with a :class:`click.BadParameter` naming
the value and what is allowed.
"""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import click

from celery_redis_retry.dlq.record import REASONS
from celery_redis_retry.redis_commands import COMMANDS
from celery_redis_retry.slots import to_bytes

if TYPE_CHECKING:
    from celery_redis_retry.dlq.admin import StoredLetter
    from celery_redis_retry.ops import RedisOp

#: What ``--command`` accepts besides Redis command names: a script op is named so too.
SCRIPT_COMMANDS = frozenset(("EVALSHA", "EVAL"))

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


def parse_duration(text: str) -> float:
    """Seconds in ``30s``, ``15m``, ``2h``, ``1d`` (also combined: ``1h30m``); ValueError if none."""
    spec = text.strip().lower()
    parts = _DURATION.findall(spec)
    if not spec or "".join(n + u for n, u in parts) != spec:
        raise ValueError(f"{text!r} is no duration: write a number and a unit, s, m, h or d (30s, 15m, 2h, 1d)")
    return sum(float(number) * _UNITS[unit] for number, unit in parts)


@dataclass(frozen=True)
class DlqFilter:
    """The records an operator selects; an empty filter selects every record.

    ``older_than`` and ``newer_than`` are seconds before ``now``, compared with the
    time the DLQ record was written (its Kafka timestamp). ``replayed`` None selects
    replays and first deaths alike.
    """

    reason: str | None = None
    outcome: str | None = None
    command: str | None = None  # upper case
    target: str | None = None
    key: str | None = None  # a Redis glob
    older_than: float | None = None
    newer_than: float | None = None
    op_ids: tuple[str, ...] = ()
    replayed: bool | None = None
    now: float = field(default_factory=time.time)

    @property
    def empty(self) -> bool:
        """Whether no criterion is set (the filter selects every record)."""
        return self == DlqFilter(now=self.now)

    def matches(self, stored: StoredLetter) -> bool:
        """Whether ``stored`` meets every criterion of this filter."""
        letter = stored.letter
        if self.op_ids and not any(stored.matches(op_id) for op_id in self.op_ids):
            return False
        if not self._matches_time(stored.timestamp_ms / 1000):
            return False
        if self.replayed is not None and (stored.replayed_from is not None) != self.replayed:
            return False
        if self.reason is not None and (letter is None or letter.reason != self.reason):
            return False
        if self.outcome is not None and (letter is None or letter.outcome != self.outcome):
            return False
        if self.command is None and self.target is None and self.key is None:
            return True
        op = letter.op if letter is not None else None
        return op is not None and self._matches_op(op)

    def _matches_time(self, written_at: float) -> bool:
        age = self.now - written_at
        if self.older_than is not None and age < self.older_than:
            return False
        return self.newer_than is None or age <= self.newer_than

    def _matches_op(self, op: RedisOp) -> bool:
        if self.target is not None and op.target != self.target:
            return False
        if self.command is not None and self.command not in op_command_names(op):
            return False
        if self.key is not None:
            pattern = self.key.encode()
            return any(fnmatch.fnmatchcase(to_bytes(key), pattern) for key in op.all_keys())
        return True

    @classmethod
    def from_options(
        cls,
        *,
        targets: Collection[str],
        scripts: Collection[str] = (),
        reason: str | None = None,
        outcome: str | None = None,
        command: str | None = None,
        target: str | None = None,
        key: str | None = None,
        older_than: str | None = None,
        newer_than: str | None = None,
        op_ids: Sequence[str] = (),
        replayed: bool | None = None,
        now: float | None = None,
    ) -> DlqFilter:
        """A filter from option values as typed; :class:`click.BadParameter` names a bad one.

        ``targets`` and ``scripts`` are the names the settings know
        (``redis_retry_targets``, ``redis_retry_scripts``).
        """
        return cls(
            reason=_checked_choice(reason, REASONS, "--reason", "DLQ reason"),
            outcome=_checked_choice(outcome, ("dead", "rejected"), "--outcome", "outcome"),
            command=_checked_command(command, scripts),
            target=_checked_choice(target, targets, "--target", "target in redis_retry_targets"),
            key=_checked_key(key),
            older_than=_checked_duration(older_than, "--older-than"),
            newer_than=_checked_duration(newer_than, "--newer-than"),
            op_ids=tuple(op_ids),
            replayed=replayed,
            now=time.time() if now is None else now,
        )


def op_command_names(op: RedisOp) -> set[str]:
    """The names ``--command`` matches for ``op``: its commands, or EVALSHA and the script's name."""
    if op.kind == "script":
        return {*SCRIPT_COMMANDS, (op.script or "").upper()}
    return {str(command[0]).upper() for command in op.commands}


def _checked_choice(value: str | None, allowed: Collection[str], option: str, what: str) -> str | None:
    if value is not None and value not in allowed:
        names = ", ".join(sorted(allowed)) or "none"
        raise click.BadParameter(f"{value!r} is no {what}; the choices are: {names}", param_hint=option)
    return value


def _checked_command(value: str | None, scripts: Collection[str]) -> str | None:
    if value is None:
        return None
    name = value.upper()
    script_names = {s.upper() for s in scripts}
    if name not in COMMANDS and name not in SCRIPT_COMMANDS and name not in script_names:
        raise click.BadParameter(
            f"{value!r} is no Redis write command this package replays, nor a script of redis_retry_scripts "
            f"({', '.join(sorted(scripts)) or 'none registered'}); e.g. SET, HSET, INCRBY, EVALSHA",
            param_hint="--command",
        )
    return name


def _checked_key(value: str | None) -> str | None:
    if value is not None and not value:
        raise click.BadParameter("an empty key pattern matches no key; use '*' for any", param_hint="--key")
    return value


def _checked_duration(value: str | None, option: str) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None



class Selection(NamedTuple):
    """What :func:`select` chose, the refs that named no record, and the replays it left out."""

    chosen: list[StoredLetter]
    unknown: list[str]
    #: Records that are themselves replays, left out because nothing chose them explicitly.
    replays_left_out: list[StoredLetter]


def select(
    records: Sequence[StoredLetter],
    *,
    refs: Sequence[str] = (),
    where: DlqFilter | None = None,
    limit: int = 0,
    replays_by_choice_only: bool = False,
) -> Selection:
    """The records named by ``refs`` (all if none) that match ``where``: the oldest ``limit`` (0: all).

    With ``replays_by_choice_only`` (what ``dlq replay`` asks), a record that is itself a
    replay is chosen only when a ref or op id names it or ``where`` asks for replays:
    an op that died again is never replayed by a broad selection alone.
    """
    where = where if where is not None else DlqFilter()
    unknown = [ref for ref in refs if not any(s.matches(ref) for s in records)]
    chosen = [s for s in records if (not refs or any(s.matches(ref) for ref in refs)) and where.matches(s)]
    left_out: list[StoredLetter] = []
    if replays_by_choice_only and not refs and not where.op_ids and where.replayed is None:
        left_out = [s for s in chosen if s.replayed_from is not None]
        chosen = [s for s in chosen if s.replayed_from is None]
    if limit:
        chosen = sorted(chosen, key=lambda s: (s.timestamp_ms, s.partition, s.offset))[:limit]
    return Selection(chosen, unknown, left_out)
