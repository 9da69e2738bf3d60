"""The end of a chaos run: every write of the ledger found in exactly one outcome, from Redis and the DLQ.

Nothing here trusts the processes' own word for what they did: effects are read from the
target servers, dead ops from the DLQ topic. The workers' logs only tell a ``superseded``
op from an applied one where Redis cannot (an idempotent SET that a newer write replaced).

A write is *certain* when the ledger says it was captured (durable in Kafka or the app's
spool, or applied directly by the wrapped client); a write the app was killed in the middle
of is *uncertain*: it may have been captured or not. A certain write must end applied,
superseded or dead; an uncertain one may also end "never captured"; none may apply twice,
and none may leave a key older than a newer write left it.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from celery_redis_retry.dlq.record import DeadLetter

from .ledger import Ledger
from .workload import Workload, Write

#: More uncertain writes on one counter than this and any sum between is accepted (subset sums explode).
_SUBSET_LIMIT = 14


@dataclass
class Accounting:
    """What the run's writes ended as; ``lost``, ``doubled`` and ``overwritten`` must stay empty."""

    certain: int = 0
    uncertain: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    doubled: list[str] = field(default_factory=list)
    overwritten: list[str] = field(default_factory=list)
    unknown_dead: list[str] = field(default_factory=list)
    #: capture-to-applied seconds of the latency writes, with their capture time.
    latencies: list[tuple[float, float]] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.lost or self.doubled or self.overwritten or self.unknown_dead)

    def summary(self) -> dict[str, Any]:
        return {
            "writes_certain": self.certain, "writes_uncertain": self.uncertain, "outcomes": dict(self.outcomes),
            "lost": len(self.lost), "doubled": len(self.doubled), "overwritten": len(self.overwritten),
            "unknown_dead": len(self.unknown_dead),
            "examples": {"lost": self.lost[:10], "doubled": self.doubled[:10], "overwritten": self.overwritten[:10],
                         "unknown_dead": self.unknown_dead[:10]},
        }


class Auditor:
    """Accounts for the ledger's writes against the targets (``clients``: target name -> redis-py client)."""

    def __init__(
        self, workload: Workload, ledger: Ledger, clients: Mapping[str, Any], dead: Iterable[DeadLetter],
        superseded_ids: set[str],
    ) -> None:
        self.workload, self.ledger, self.clients = workload, ledger, clients
        self.superseded_ids = superseded_ids
        ids = ledger.op_ids()
        self.dead: dict[int, str] = {}
        self.result = Accounting()
        for letter in dead:
            op_id = letter.op.id if letter.op is not None else None
            if op_id in ids:
                self.dead[ids[op_id]] = letter.reason
            else:  # a marker, or no op of this run: either way nothing should have died
                self.result.unknown_dead.append(f"{op_id}: {letter.reason}")
        self.writes: list[Write] = [workload.write(i) for i in sorted(ledger.intended)]

    def run(self) -> Accounting:
        result = self.result
        by_family: dict[str, list[Write]] = defaultdict(list)
        for write in self.writes:
            by_family["kv" if write.family == "app" else write.family].append(write)
            if self.ledger.certain(write.index):
                result.certain += 1
            else:
                result.uncertain += 1
            if write.index in self.dead:
                result.outcomes[f"dead:{self.dead[write.index]}"] += 1
        self._lists(by_family["list"], lambda w: w.key)
        self._lists(by_family["txn"], lambda w: f"{w.key}:l")
        self._sums(by_family["counter"], lambda w: w.key)
        self._sums(by_family["script"], lambda w: w.key)
        self._sums(by_family["txn"], lambda w: f"{w.key}:n", count=False)
        self._last_write_wins(by_family["kv"], by_family["hash"])
        self._versions(by_family["versioned"])
        self._latency(by_family["latency"])
        return result

    # -- helpers ---------------------------------------------------------------------------

    def _fetch(self, target: str, command: str, keys: list[str], *args: Any) -> list[Any]:
        client = self.clients[target]
        with client.pipeline(transaction=False) as pipe:
            for key in keys:
                getattr(pipe, command)(key, *args)
            return list(pipe.execute())

    def _grouped(self, writes: list[Write], key_of: Any) -> dict[tuple[str, str], list[Write]]:
        grouped: dict[tuple[str, str], list[Write]] = defaultdict(list)
        for write in writes:
            if write.index not in self.dead:
                grouped[(write.target, key_of(write))].append(write)
        return grouped

    def _count(self, write: Write, applied: int) -> None:
        """Record an op whose effect Redis shows exactly: ``applied`` times."""
        certain = self.ledger.certain(write.index)
        if applied > 1:
            self.result.doubled.append(f"write {write.index} ({write.family} {write.key}) applied {applied} times")
        elif applied == 1:
            self.result.outcomes["applied"] += 1
        elif certain:
            self.result.lost.append(f"write {write.index} ({write.family} {write.key}) never applied")
        else:
            self.result.outcomes["never captured (app killed)"] += 1

    # -- the families ----------------------------------------------------------------------

    def _lists(self, writes: list[Write], key_of: Any) -> None:
        for (target, key), group in self._grouped(writes, key_of).items():
            held = Counter(v.decode() for v in self._fetch(target, "lrange", [key], 0, -1)[0])
            for write in group:
                self._count(write, held.pop(write.value, 0))
            for value, times in held.items():
                self.result.doubled.append(f"{key} holds {value!r} x{times}, a value no write of the ledger pushed")

    def _sums(self, writes: list[Write], key_of: Any, *, count: bool = True) -> None:
        grouped = self._grouped(writes, key_of)
        for (target, key), group in grouped.items():
            held = int(self._fetch(target, "get", [key])[0] or 0)
            sure = sum(w.amount for w in group if self.ledger.certain(w.index))
            maybe = [w.amount for w in group if not self.ledger.certain(w.index)]
            extra = held - sure
            if _reachable(extra, maybe):
                if count:
                    self.result.outcomes["applied"] += sum(1 for w in group if self.ledger.certain(w.index))
                    self.result.outcomes["uncertain (counted in a sum)"] += len(maybe)
            elif extra < 0:
                self.result.lost.append(f"{key} is {held}, {-extra} short of the {sure} its writes add up to")
            else:
                self.result.doubled.append(f"{key} is {held}, {extra} over the {sure} its writes add up to")

    def _last_write_wins(self, kv_writes: list[Write], hash_writes: list[Write]) -> None:
        """kv, app and hash writes: each key (or field) ends as its last write left it."""
        for (target, key), group in self._grouped(kv_writes, lambda w: w.key).items():
            value, ttl = self._fetch(target, "get", [key])[0], self._fetch(target, "pttl", [key])[0]
            held = None if value is None else (value.decode(), ttl > 0)
            self._judge(key, group, held, lambda w: None if w.action == "DEL" else (w.value, w.action == "EX"))
        for (target, key), group in self._grouped(hash_writes, lambda w: w.key).items():
            fields = {f.decode(): v.decode() for f, v in self._fetch(target, "hgetall", [key])[0].items()}
            for name in sorted({w.action for w in group}):
                self._judge(f"{key}[{name}]", [w for w in group if w.action == name], fields.get(name),
                            lambda w: w.value)

    def _judge(self, where: str, group: list[Write], held: Any, state_of: Any) -> None:
        certain = [w for w in group if self.ledger.certain(w.index)]
        last = certain[-1] if certain else None
        allowed = {state_of(last) if last else None}
        later = [w for w in group if last is None or w.index > last.index]
        allowed |= {state_of(w) for w in later if not self.ledger.certain(w.index)}
        for write in group:
            if write.family == "app" and write.index not in self.ledger.captured:
                self.result.outcomes["applied directly (app write)"] += self.ledger.certain(write.index)
            elif self.ledger.intended.get(write.index, "-") in self.superseded_ids or \
                    self.ledger.captured.get(write.index) in self.superseded_ids:
                self.result.outcomes["superseded"] += 1
            elif self.ledger.certain(write.index):
                self.result.outcomes["applied (or replaced before replay)"] += 1
        if held not in allowed:
            older = [w.index for w in group if state_of(w) == held]
            what = f"write {older[-1]}'s" if older else "no write's"
            self.result.overwritten.append(
                f"{where} holds {held!r} ({what}), not the last write {last.index if last else None}: {allowed}"
            )

    def _versions(self, writes: list[Write]) -> None:
        for (target, key), group in self._grouped(writes, lambda w: w.key).items():
            value, version = self._fetch(target, "get", [key, f"{key}:version"])
            sure = max((w.index for w in group if self.ledger.certain(w.index)), default=None)
            maybe = {w.index for w in group if not self.ledger.certain(w.index) and (sure is None or w.index > sure)}
            got = int(version) if version is not None else None
            if got != sure and got not in maybe:
                self.result.overwritten.append(f"{key} at version {got}, not {sure}")
            elif got is not None and (value or b"").decode() != str(got):
                self.result.overwritten.append(f"{key} holds {value!r} at version {got}")
            for write in group:
                if write.index == got:
                    self.result.outcomes["applied"] += 1
                elif self.ledger.certain(write.index):
                    self.result.outcomes["superseded (older version)"] += 1

    def _latency(self, writes: list[Write]) -> None:
        by_target: dict[str, list[Write]] = defaultdict(list)
        for write in writes:
            if write.index not in self.dead:
                by_target[write.target].append(write)
        for target, group in by_target.items():
            for write, value in zip(group, self._fetch(target, "get", [w.key for w in group]), strict=True):
                self._count(write, 0 if value is None else 1)
                if value is not None:
                    created = self.ledger.created_at[write.index]
                    self.result.latencies.append((created, float(value) - created))


def _reachable(extra: int, maybe: list[int]) -> bool:
    """Whether ``extra`` is the sum of some of the uncertain amounts ``maybe`` (each 0 or 1 times)."""
    if extra < 0 or extra > sum(maybe):
        return False
    if len(maybe) > _SUBSET_LIMIT:
        return True
    sums = {0}
    for amount in maybe:
        sums |= {s + amount for s in sums}
    return extra in sums


def superseded_in_logs(texts: Iterable[str]) -> set[str]:
    """The op ids the workers logged as superseded."""
    return {m for text in texts for m in re.findall(r"op (\S+) superseded", text)}
