"""The demo's accounting: every write of the story, checked against Redis, the topic and the DLQ.

Nothing here trusts a counter of the code under test. A captured op counts as
*published* when it is read back from Kafka, *applied* when Redis shows its effect (and
its dedupe marker, for non-idempotent ops), *dead* when its record is in the DLQ topic;
counters and scores must add up exactly (more means a duplicate, less a loss).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis

from celery_redis_retry.demo.story import Ledger, Write
from celery_redis_retry.dlq.record import DeadLetter, decode_record
from celery_redis_retry.errors import DecodeError
from celery_redis_retry.message import decode
from celery_redis_retry.testing import read_topic


@dataclass
class Accounting:
    """The table the demo ends with."""

    attempted: int = 0
    direct: int = 0
    refused: int = 0
    failed: int = 0
    captured: int = 0
    published: int = 0
    applied: int = 0
    expired: int = 0
    #: Captured hot-key writes a newer write had overtaken: the newer one stayed.
    superseded: int = 0
    #: Hot keys whose newer write a replay overwrote (must be 0), and how many were written again.
    overwritten: int = 0
    hot_keys: int = 0
    #: DLQ records of captured ops by reason (``dead``: Redis refused the replay; ``rejected``:
    #: the bridge refused the op, never valid).
    dead: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    #: Messages put straight onto the topic, not by the app (a newer client's), and their
    #: DLQ records by reason: not captured writes, so a row of their own.
    foreign: int = 0
    foreign_rejected: Counter[str] = field(default_factory=Counter)
    #: Captured ops found in the DLQ, dead or rejected.
    dead_letters: int = 0
    lost: int = 0
    duplicates: int = 0
    totals_checked: int = 0
    drain_seconds: float | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ended(self) -> int:
        """The rows a published op ends in: applied, expired, superseded, dead or rejected."""
        return self.applied + self.expired + self.superseded + sum(self.dead.values()) + sum(self.rejected.values())

    @property
    def sums(self) -> list[str]:
        """How the table's rows fail to add up as printed (empty when they do)."""
        wrong = []
        if self.direct + self.captured + self.refused + self.failed != self.attempted:
            wrong.append(f"writes attempted {self.attempted} != {self.direct} applied at once + {self.captured} "
                         f"captured + {self.refused} refused at once + {self.failed} failed")
        if self.ended != self.published:
            wrong.append(f"published {self.published} != applied + expired + superseded + dead + rejected "
                         f"{self.ended}")
        if sum(self.foreign_rejected.values()) != self.foreign:
            wrong.append(f"{self.foreign} foreign messages but {sum(self.foreign_rejected.values())} rejected")
        return wrong

    @property
    def balanced(self) -> bool:
        """Every captured op applied, expired or dead as expected; nothing lost or doubled; the rows add up."""
        accounted = self.applied + self.expired + self.dead_letters + self.superseded
        return (
            not self.problems and self.lost == 0 and self.duplicates == 0 and self.failed == 0
            and self.overwritten == 0 and not self.sums
            and self.published == self.captured and accounted == self.captured
        )

    def problem(self, text: str, *, lost: bool = False) -> None:
        self.lost += lost
        if len(self.problems) < 20:
            self.problems.append(text)


def _run_probes(client: redis.Redis, probes: list[tuple[Any, ...]]) -> list[Any]:
    replies: list[Any] = []
    for start in range(0, len(probes), 2000):
        with client.pipeline(transaction=False) as pipe:
            for probe in probes[start : start + 2000]:
                pipe.execute_command(*probe)  # type: ignore[no-untyped-call]
            replies += pipe.execute(raise_on_error=False)
    return replies


class Tracker:
    """The backlog: captured ops Redis does not show as applied yet (for the progress bar)."""

    def __init__(self) -> None:
        self.pending: list[Write] = []
        self.total = 0
        #: When a poll last found the backlog empty (None while ops are pending).
        self.empty_at: float | None = None

    @property
    def done(self) -> int:
        return self.total - len(self.pending)

    def add(self, write: Write) -> None:
        """Track a captured write, unless it can only end in the DLQ."""
        if write.path == "captured" and write.captured_probe() is not None:
            self.pending.append(write)
            self.total += 1
            self.empty_at = None

    def poll(self, client: redis.Redis) -> int:
        """Check Redis once; return how many of the tracked ops are applied (or expired)."""
        if self.pending:
            now_ms = time.time() * 1000
            probes = [w.captured_probe() for w in self.pending]
            replies = _run_probes(client, [p[0] for p in probes if p is not None])
            self.pending = [
                w for w, p, reply in zip(self.pending, probes, replies, strict=True)
                if p is not None and not p[1](reply) and not _expired(w, now_ms)
            ]
        if not self.pending and self.empty_at is None:
            self.empty_at = time.monotonic()
        return self.done


def _expired(write: Write, now_ms: float) -> bool:
    return write.expires_at_ms is not None and write.expires_at_ms <= now_ms


def read_dead_letters(
    bootstrap: str, dlq_topic: str, expected: int, timeout: float
) -> tuple[list[DeadLetter], float | None]:
    """Every DLQ record, once ``expected`` are there; and when they were all there (None: never)."""
    complete_at: float | None = None
    try:
        read_topic(bootstrap, dlq_topic, count=expected, timeout=timeout)
        complete_at = time.monotonic()
    except TimeoutError:
        pass  # the accounting says which ones are missing
    # Read again to the end: a record beyond the expected ones must be seen too.
    records = read_topic(bootstrap, dlq_topic, idle=1.5, timeout=timeout)
    return [decode_record(r.value or b"") for r in records], complete_at


def account(
    client: redis.Redis, ledger: Ledger, *, bootstrap: str, topic: str, letters: Iterable[DeadLetter],
    foreign_messages: int,
) -> Accounting:
    """Check every write of ``ledger`` against Redis, ``topic`` and the dead ``letters``."""
    acc = Accounting(attempted=len(ledger.writes), foreign=foreign_messages)
    acc.direct, acc.refused = len(ledger.by_path("direct")), len(ledger.by_path("refused"))
    failed = ledger.by_path("failed")
    acc.failed = len(failed)
    for write in failed[:5]:
        acc.problem(f"write {write.index} ({write.kind}) failed and was not captured: {write.error}")
    captured = ledger.captured
    acc.captured = len(captured)
    _check_published(acc, captured, bootstrap, topic, foreign_messages)
    dead_by_id = _check_dlq(acc, captured, letters)
    _check_writes(acc, client, ledger, dead_by_id)
    _check_totals(acc, client, ledger)
    acc.hot_keys = len(ledger.latest)
    for wrong in acc.sums:
        acc.problem(f"the table does not add up: {wrong}")
    return acc


def _check_published(acc: Accounting, captured: list[Write], bootstrap: str, topic: str, foreign: int) -> None:
    expected = len(captured) + foreign
    try:
        records = read_topic(bootstrap, topic, count=expected, timeout=30) if expected else []
    except TimeoutError as exc:
        acc.problem(f"topic {topic}: {exc}")
        records = read_topic(bootstrap, topic, idle=2)
    ids: set[str] = set()
    for record in records:
        try:
            ids.add(decode(record.value or b"").id)
        except DecodeError:
            pass  # the foreign message: the bridge rejects it, see the DLQ check
    for write in captured:
        assert write.op is not None
        if write.op.id in ids:
            acc.published += 1
        else:
            acc.problem(f"op {write.op.id} ({write.kind}) was captured but is not in {topic}", lost=True)


def _check_dlq(acc: Accounting, captured: list[Write], letters: Iterable[DeadLetter]) -> dict[str, DeadLetter]:
    expected = {w.op.id: w for w in captured if w.op is not None and w.dlq is not None}
    by_id: dict[str, DeadLetter] = {}
    for letter in letters:
        op_id = letter.op_id
        if op_id is None:  # undecodable: the foreign message
            acc.foreign_rejected[letter.reason] += 1
            continue
        (acc.rejected if letter.outcome == "rejected" else acc.dead)[letter.reason] += 1
        if op_id in by_id:
            acc.duplicates += 1
            acc.problem(f"op {op_id} is in the DLQ twice")
            continue
        by_id[op_id] = letter
        write = expected.get(op_id)
        if write is None:
            acc.problem(f"op {op_id} is in the DLQ ({letter.reason}: {letter.error_message:.100}) but should apply")
        elif (letter.outcome, letter.reason) != write.dlq:
            acc.problem(f"op {op_id} is in the DLQ as {letter.outcome}/{letter.reason}, expected {write.dlq}")
    return by_id


def _check_writes(acc: Accounting, client: redis.Redis, ledger: Ledger, dead: dict[str, DeadLetter]) -> None:
    now_ms = time.time() * 1000
    checks: list[tuple[Write, tuple[Any, ...], Any]] = []
    for write in ledger.writes:
        if write.probe is not None and write.expect is not None and write.path in ("direct", "captured", "refused"):
            checks.append((write, write.probe, write.expect))
        replay = write.captured_probe() if write.path == "captured" else None
        if replay is not None and replay[0] != write.probe:
            checks.append((write, *replay))
    replies = _run_probes(client, [probe for _, probe, _ in checks])
    failing = {id(w) for (w, _, expect), reply in zip(checks, replies, strict=True) if not expect(reply)}
    for write in ledger.writes:
        ok = id(write) not in failing
        if write.path == "captured":
            _check_captured(acc, write, ok, dead, now_ms, latest=ledger.latest)
        elif write.path == "direct" and not ok and not _expired(write, now_ms):
            acc.problem(f"write #{write.index} ({write.kind}) succeeded but its effect is gone", lost=True)


def _check_captured(
    acc: Accounting, write: Write, ok: bool, dead: dict[str, DeadLetter], now_ms: float, *, latest: dict[str, bytes]
) -> None:
    assert write.op is not None
    if write.op.id in dead:
        acc.dead_letters += 1  # one that should have applied is reported by _check_dlq
        if write.dlq is not None and not ok:
            acc.problem(f"dead-lettered op {write.op.id} ({write.kind}) left an effect in Redis")
    elif write.dlq is not None:
        acc.problem(f"op {write.op.id} ({write.kind}) can never apply but is not in the DLQ", lost=True)
    elif write.kind == "price":
        if not ok:
            acc.overwritten += 1
            acc.problem(f"op {write.op.id} (price #{write.index}) overwrote the app's newer write", lost=True)
        elif write.probe is not None and write.value == latest.get(write.probe[1]):
            acc.applied += 1  # the app's last write to that key: applied
        else:
            acc.superseded += 1
    elif ok:
        acc.applied += 1
    elif _expired(write, now_ms):
        acc.expired += 1
    else:
        acc.problem(f"op {write.op.id} ({write.kind} #{write.index}) is not applied in Redis", lost=True)


def _check_totals(acc: Accounting, client: redis.Redis, ledger: Ledger) -> None:
    totals = sorted(ledger.totals.items())
    probes = [(command, key, member) if member else (command, key) for (command, key, member), _ in totals]
    for ((command, key, member), expected), reply in zip(totals, _run_probes(client, probes), strict=True):
        actual = float(reply or 0)
        acc.totals_checked += 1
        where = f"{command} {key} {member}".strip()
        if actual > expected:
            acc.duplicates += 1
            acc.problem(f"{where} is {actual:g}, expected {expected}: applied more than once")
        elif actual < expected:
            acc.problem(f"{where} is {actual:g}, expected {expected}: an increment is missing", lost=True)
