"""The backlog a drain benchmark replays: a mix of commands, spread over targets, and how to tell it is applied.

Every op writes one key of its own (``user:<n>:<kind>``), so the target's state says which
ops were applied: the key exists after a SET, HSET, INCRBY or RPUSH, and is gone after a
DEL (whose key :func:`seed` writes beforehand). The raw baseline sends exactly the same
commands (``op.commands``) with redis-py pipelines.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from celery_redis_retry import message, ops
from celery_redis_retry.message import Signer
from celery_redis_retry.ops import RedisOp

#: The commands of the mixed workload, in the order of ``--mix``.
KINDS = ("set", "hset", "del", "incrby", "rpush")
#: Replaying these twice would change Redis twice: the replay guards them with a marker.
NON_IDEMPOTENT = ("incrby", "rpush")
IDEMPOTENT = tuple(k for k in KINDS if k not in NON_IDEMPOTENT)
#: The default backlog: every command in an equal share.
DEFAULT_MIX = {kind: 1 / len(KINDS) for kind in KINDS}

# A cached user profile as a service would write it (the values of bench_publish's SET ops).
_PROFILE = (
    "name=User {n};email=user{n}@example.com;plan=pro;locale=en-GB;tz=Europe/London;"
    "last_login=2026-11-22T05:53:57Z;bio={bio}"
)


def parse_mix(text: str) -> dict[str, float]:
    """``"set"``, ``"set,incrby"`` (equal shares) or ``"set=60,incrby=40"`` -> shares summing to 1.

    :raises ValueError: naming the unknown command or the bad share.
    """
    weights: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, share = part.partition("=")
        name = name.strip().lower()
        if name not in KINDS:
            raise ValueError(f"unknown command {name!r} in mix {text!r} (known: {', '.join(KINDS)})")
        try:
            weight = float(share) if share else 1.0
        except ValueError:
            raise ValueError(f"share {share!r} of {name} in mix {text!r} is not a number") from None
        if weight < 0:
            raise ValueError(f"share of {name} in mix {text!r} is negative")
        weights[name] = weights.get(name, 0.0) + weight
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"mix {text!r} names no command with a positive share")
    return {name: weight / total for name, weight in weights.items() if weight > 0}


def non_idempotent_mix(percent: float) -> dict[str, float]:
    """``percent`` % of INCRBY and RPUSH (half each), the rest SET, HSET and DEL in equal shares."""
    share = percent / 100
    return {**{k: (1 - share) / len(IDEMPOTENT) for k in IDEMPOTENT},
            **{k: share / len(NON_IDEMPOTENT) for k in NON_IDEMPOTENT}}


def describe_mix(mix: dict[str, float]) -> str:
    """``"SET 20%, HSET 20%, ..."``."""
    return ", ".join(f"{name.upper()} {100 * share:.3g}%" for name, share in mix.items() if share > 0)


def target_names(count: int) -> list[str]:
    """``["default", "t1", ...]``: the names of ``count`` targets in ``redis_retry_targets``."""
    return ["default", *(f"t{i}" for i in range(1, count))]


def _kinds(mix: dict[str, float], count: int) -> list[str]:
    """Exactly each share of ``count`` (largest remainders), in a fixed shuffled order."""
    exact = {name: share * count for name, share in mix.items()}
    counts = {name: int(value) for name, value in exact.items()}
    short = count - sum(counts.values())
    for name in sorted(exact, key=lambda n: exact[n] - counts[n], reverse=True)[:short]:
        counts[name] += 1
    kinds = [name for name, n in counts.items() for _ in range(n)]
    random.Random(count).shuffle(kinds)  # the same backlog for the same size, every run
    return kinds


def build_op(kind: str, n: int) -> RedisOp:
    """Op number ``n`` of ``kind``, writing the key ``user:<n>:<kind>``, with a source and a trace id."""
    key = f"user:{n}:{kind}"
    if kind == "set":
        op = ops.set(key, _PROFILE.format(n=n, bio="x" * (20 + n % 17)), ex=3600)
    elif kind == "hset":
        op = ops.hset(key, {"plan": "pro", "locale": "en-GB", "tz": "Europe/London", "seen": str(n)})
    elif kind == "del":
        op = ops.delete(key)
    elif kind == "incrby":
        op = ops.incrby(key, 1 + n % 5)
    elif kind == "rpush":
        op = ops.rpush(key, f"login n={n} at=2026-11-22T05:53:57Z from=web")
    else:
        raise ValueError(f"unknown command {kind!r} (known: {', '.join(KINDS)})")
    return op.with_source(f"UserRepo.{kind}").with_context(trace_id=f"{n * 2654435761 % 2**128:032x}")


@dataclass
class Backlog:
    """``count`` ops of ``mix``, op ``n`` aimed at target ``n % targets`` (an even spread by key)."""

    count: int
    mix: dict[str, float]
    targets: int = 1
    kinds: list[str] = field(init=False)

    def __post_init__(self) -> None:
        if self.count < 1 or self.targets < 1:
            raise ValueError(f"a backlog needs >= 1 op and >= 1 target, not {self.count} and {self.targets}")
        self.kinds = _kinds(self.mix, self.count)

    def target_of(self, n: int) -> int:
        return n % self.targets

    def ops(self) -> Iterable[RedisOp]:
        """The ops in publish order (built lazily: a million of them take a while)."""
        names = target_names(self.targets)
        for n, kind in enumerate(self.kinds):
            op = build_op(kind, n)
            yield op if self.targets == 1 else op.with_target(names[self.target_of(n)])

    def commands(self) -> list[list[tuple[Any, ...]]]:
        """Per target, the very commands of its ops, in order (what the raw baseline sends)."""
        out: list[list[tuple[Any, ...]]] = [[] for _ in range(self.targets)]
        for n, op in enumerate(self.ops()):
            out[self.target_of(n)].append(op.commands[0])
        return out

    def key_of(self, n: int) -> str:
        return f"user:{n}:{self.kinds[n]}"

    def deleted(self, n: int) -> bool:
        return self.kinds[n] == "del"

    def mean_message_bytes(self, sample: int = 1000, signer: Signer | None = None) -> float:
        """Mean size of the encoded messages of the first ``sample`` ops (signed by ``signer`` if given)."""
        sizes = [len(message.encode(op, signer)) for _, op in zip(range(sample), self.ops(), strict=False)]
        return sum(sizes) / len(sizes)


def seed(clients: Sequence[redis.Redis], backlog: Backlog) -> int:
    """Write the keys the backlog's DELs delete, on their targets; return how many."""
    pipes = [client.pipeline(transaction=False) for client in clients]
    seeded = 0
    for n in range(backlog.count):
        if backlog.deleted(n):
            pipes[backlog.target_of(n)].set(backlog.key_of(n), "to be deleted")
            seeded += 1
            if seeded % 1000 == 0:
                for pipe in pipes:
                    pipe.execute()
    for pipe in pipes:
        pipe.execute()
    return seeded


def raw_pipelined(clients: Sequence[redis.Redis], commands: list[list[tuple[Any, ...]]], size: int) -> None:
    """Each target's commands with redis-py pipelines of ``size``, from this process, one target after another."""
    for client, mine in zip(clients, commands, strict=True):
        for first in range(0, len(mine), size):
            pipe = client.pipeline(transaction=False)
            for command in mine[first:first + size]:
                pipe.execute_command(*command)
            pipe.execute()


@dataclass
class _Chunk:
    target: int
    keys: list[str]
    present: bool  # applied means the key exists (False: a DEL, applied when it is gone)


class AppliedTracker:
    """Counts the applied ops of a backlog from the targets' keys, exactly once all are applied.

    Keys are checked with ``EXISTS`` in chunks of :attr:`CHUNK`, in publish order; a chunk
    found complete is never checked again. A count stops early after two chunks in a row with
    nothing applied (the drain has not got there yet) or :attr:`BUDGET` keys, so a poll costs
    the targets little; the count is then a lower bound, and :attr:`done` is exact.
    """

    CHUNK = 1000
    BUDGET = 20_000

    def __init__(self, clients: Sequence[redis.Redis], backlog: Backlog) -> None:
        self.clients = clients
        self.total = backlog.count
        open_chunks: dict[tuple[int, bool], _Chunk] = {}
        self.pending: list[_Chunk] = []
        for n in range(backlog.count):
            slot = (backlog.target_of(n), not backlog.deleted(n))
            chunk = open_chunks.get(slot)
            if chunk is None or len(chunk.keys) >= self.CHUNK:
                chunk = open_chunks[slot] = _Chunk(slot[0], [], slot[1])
                self.pending.append(chunk)
            chunk.keys.append(backlog.key_of(n))
        self.complete = 0

    @property
    def done(self) -> bool:
        return not self.pending

    def count(self, *, exhaustive: bool = False) -> int:
        """Ops applied now (a lower bound until :attr:`done`, unless ``exhaustive``: every chunk checked)."""
        budget = self.total + 1 if exhaustive else self.BUDGET
        most_idle = self.total + 1 if exhaustive else 2
        partial = checked = idle = 0
        still: list[_Chunk] = []
        for index, chunk in enumerate(self.pending):
            if idle >= most_idle or checked >= budget:
                still.extend(self.pending[index:])
                break
            existing = int(self.clients[chunk.target].exists(*chunk.keys))
            applied = existing if chunk.present else len(chunk.keys) - existing
            checked += len(chunk.keys)
            if applied == len(chunk.keys):
                self.complete += applied
                continue
            still.append(chunk)
            partial += applied
            idle = idle + 1 if applied == 0 else 0
        self.pending = still
        return self.complete + partial
