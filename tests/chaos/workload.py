"""The chaos workload: which write op number ``i`` is, for a seed, and what it must leave in Redis.

Every op is fully determined by ``(seed, i)``, so the publishing app, which may be
SIGKILLed and restarted, and the accounting at the end agree on it without sharing
anything but the ledger (:mod:`ledger`). The families, each chosen so that a lost op, an
op applied twice and an older write over a newer one all show in the final state:

========== ========================================== ==========================================
family     op                                         what proves it
========== ========================================== ==========================================
list       ``RPUSH l:<k> i``                          ``i`` appears exactly once
counter    ``INCRBY n:<k> amount``                    the counter is the exact sum
script     registered ``bump`` script, ``INCRBY`` Lua the counter is the exact sum
txn        ``MULTI INCRBY {t<k>}:n; RPUSH {t<k>}:l``  both effects, once
kv         ``SET``/``SET EX``/``DEL`` of ``kv:<k>``   the key ends as the *last* write left it
app        the same keys, written by the app          (ditto: a replay never overwrites these)
           through a wrapped client: direct when
           the target answers, captured when not
hash       ``HSET h:<k> f<j> i``                      each field ends at its last write
versioned  ``SET {v<k>} i`` if version < i            the value is the highest version
latency    registered ``stamp`` script                when it applied (server clock)
========== ========================================== ==========================================

Keys carry a hash tag where an op touches two keys, so every op also runs on a Redis
Cluster target. Each op goes to one of the targets, by its key.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from celery_redis_retry import ops

#: Keys per family: few enough that many ops share a key (races, sums), many enough to spread.
KEYS_PER_FAMILY = 64
#: (family, weight): how often each family is drawn.
FAMILIES: tuple[tuple[str, int], ...] = (
    ("list", 20), ("counter", 15), ("script", 8), ("txn", 8), ("kv", 20), ("app", 10), ("hash", 8),
    ("versioned", 6), ("latency", 5),
)
_NAMES = [name for name, _ in FAMILIES]
_WEIGHTS = [weight for _, weight in FAMILIES]
PREFIX = "chaos:"


@dataclass(frozen=True)
class Write:
    """Op number ``index`` of the workload: its family, target, key and what it writes."""

    index: int
    family: str
    target: str
    key: str
    #: SET/DEL/EX for kv and app; the field for hash; the amount for sums.
    action: str = ""
    amount: int = 0

    @property
    def value(self) -> str:
        return str(self.index)

    @property
    def published(self) -> bool:
        """Whether the app publishes the op itself (all but ``app`` writes, which go through the wrapped client)."""
        return self.family != "app"

    def build(self) -> ops.RedisOp:
        """The op, built the way an application builds it after a failed write."""
        family, key = self.family, self.key
        if family == "list":
            op = ops.rpush(key, self.value)
        elif family == "counter":
            op = ops.incrby(key, self.amount)
        elif family == "script":
            op = ops.script("bump", keys=[key], args=[self.amount])
        elif family == "txn":
            op = ops.pipeline([ops.incrby(f"{key}:n", self.amount), ops.rpush(f"{key}:l", self.value)])
        elif family == "kv":
            op = self._kv_op()
        elif family == "hash":
            op = ops.hset(key, self.action, self.value)
        elif family == "versioned":
            op = ops.set(key, self.value).if_version(self.index, key=f"{key}:version")
        elif family == "latency":
            op = ops.script("stamp", keys=[key])
        else:
            raise ValueError(f"write {self.index} of family {family!r} is not published as an op")
        return op.with_target(self.target)

    def _kv_op(self) -> ops.RedisOp:
        if self.action == "DEL":
            return ops.delete(self.key)
        if self.action == "EX":
            return ops.set(self.key, self.value, ex=3600)
        return ops.set(self.key, self.value)

    def apply_direct(self, client: Any) -> None:
        """Write it through ``client`` (a wrapped client): the ``app`` family's writes."""
        if self.action == "DEL":
            client.delete(self.key)
        elif self.action == "EX":
            client.set(self.key, self.value, ex=3600)
        else:
            client.set(self.key, self.value)


class Workload:
    """The writes of one seed, spread over ``targets``."""

    def __init__(self, seed: int, targets: tuple[str, ...] = ("default",)) -> None:
        self.seed = seed
        self.targets = targets

    def write(self, index: int) -> Write:
        rng = random.Random(self.seed * 1_000_003 + index)
        family = rng.choices(_NAMES, _WEIGHTS)[0]
        k = rng.randrange(KEYS_PER_FAMILY)
        target = self.targets[k % len(self.targets)]
        key, action, amount = self._key(family, k, index), "", 0
        if family in ("counter", "script", "txn"):
            amount = rng.randrange(1, 1000)
        elif family in ("kv", "app"):
            action = rng.choices(("SET", "EX", "DEL"), (6, 2, 1))[0]
        elif family == "hash":
            action = f"f{rng.randrange(8)}"
        return Write(index, family, target, key, action, amount)

    @staticmethod
    def _key(family: str, k: int, index: int) -> str:
        if family in ("kv", "app"):
            return f"{PREFIX}kv:{k}"  # both families write the same keys: replays race the app's own writes
        if family == "txn":
            return f"{PREFIX}{{t{k}}}"
        if family == "versioned":
            return f"{PREFIX}{{v{k}}}"
        if family == "latency":
            return f"{PREFIX}lat:{index}"
        return f"{PREFIX}{family}:{k}"
