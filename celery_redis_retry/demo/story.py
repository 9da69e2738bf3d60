"""The demo's web app: a realistic mix of Redis writes, and the state each one must leave.

Every write is recorded in a :class:`Ledger` with how it went for the app (``direct``:
Redis answered; ``captured``: it failed and was published as an op; ``refused``: Redis
answered with an error no retry can fix) and with a *probe*, a Redis command whose
reply shows the write's effect. The story is built so that the final state does not
depend on the order in which concurrent retries land: every write has keys of its own,
or an effect that commutes (INCRBY, ZINCRBY, SADD), where exactly-once shows as an
exact sum. Non-idempotent ops leave a dedupe marker when replayed, so "applied once"
is read from Redis for each of them.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import redis

import celery_redis_retry
from celery_redis_retry import ops
from celery_redis_retry.ops import RedisOp
from celery_redis_retry.slots import marker_key

#: The writes of ten requests in a row; every 50th "cache" is a "mistake" instead (see _mistake).
CYCLE = ("cache", "profile", "views", "logout", "cache", "order", "points", "cache", "views", "cache")
PAGES = ("home", "search", "product", "cart", "checkout")
PLAYERS = ("ada", "grace", "linus", "guido", "barbara")
CACHE_TTL = 600
#: Prices the app writes on every request while Redis is down, then all again the moment it is
#: back: their replays must find the newer write and leave it (``superseded``).
HOT_KEYS = 20
#: A key that is a string: pushing to it is a bug Redis refuses with WRONGTYPE.
LEGACY_FEED = "legacy:feed"

Probe = tuple[Any, ...]


@dataclass
class Write:
    """One write of the story and what it must leave in Redis."""

    index: int
    kind: str
    #: A Redis command whose reply shows the effect, and the check of that reply.
    probe: Probe | None = None
    expect: Callable[[Any], bool] | None = None
    #: ``direct`` | ``captured`` | ``refused`` | ``failed`` (the app saw an error).
    path: str = ""
    op: RedisOp | None = None
    #: The DLQ outcome and reason expected when captured: such a write can never be applied.
    dlq: tuple[str, str] | None = None
    #: Absolute expiry (ms) of a cache entry: once past, a missing key is ``expired``.
    expires_at_ms: int | None = None
    #: Contributions to the ledger's totals, counted once the write went through or was captured.
    adds: list[tuple[tuple[str, str, str], int]] = field(default_factory=list)
    error: str = ""
    #: What a hot-key write wrote (the key must end at the ledger's latest value for it).
    value: bytes | None = None

    def captured_probe(self) -> tuple[Probe, Callable[[Any], bool]] | None:
        """How to see the replay of a captured op: its effect, or its dedupe marker."""
        if self.op is None or self.dlq is not None:
            return None
        if self.kind in ("views", "order", "points"):  # not idempotent: replayed with a marker
            return ("EXISTS", marker_key(self.op)), lambda reply: reply == 1
        assert self.probe is not None
        assert self.expect is not None
        return self.probe, self.expect


@dataclass
class Ledger:
    """Every write of the story, and the totals the commutative ones must add up to."""

    writes: list[Write] = field(default_factory=list)
    #: (probe command, key, member) -> expected total: counters, leaderboard scores, set members.
    totals: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    #: Hot key -> the value the app wrote to it last, directly or captured.
    latest: dict[str, bytes] = field(default_factory=dict)

    def by_path(self, path: str) -> list[Write]:
        return [w for w in self.writes if w.path == path]

    @property
    def captured(self) -> list[Write]:
        return self.by_path("captured")


class WebApp:
    """The application under test: it writes through ``wrap()`` and the ``on_failure`` guard."""

    def __init__(self, client: redis.Redis, ledger: Ledger, scripts: dict[str, str], seed: int = 7) -> None:
        self.plain = client
        self._last_op: RedisOp | None = None
        # Zero boilerplate: every write through `self.r` is captured on a retryable error.
        self.r = celery_redis_retry.wrap(client, on_capture=self._captured)
        # Registered in redis_retry_scripts: wrap() captures their EVALSHA as ops.script(name, ...).
        self.award_points = self.r.register_script(scripts["award_points"])
        self.rank_v2 = self.r.register_script(scripts["recompute_rank_v2"])
        self.ledger = ledger
        self.rng = random.Random(seed)

    def _captured(self, op: RedisOp) -> None:
        self._last_op = op

    def prepare(self, count: int) -> None:
        """Keys the story acts on later: the sessions it logs out, the legacy feed."""
        sessions = {f"session:{i}": "active" for i in range(count) if CYCLE[i % len(CYCLE)] == "logout"}
        for start in range(0, len(sessions), 1000):
            chunk = dict(list(sessions.items())[start : start + 1000])
            self.plain.mset(chunk)
        self.plain.set(LEGACY_FEED, "v1 feed, a string")

    def request(self, index: int) -> Write:
        """Serve request ``index``: one write, recorded with how it went."""
        write = Write(index, "mistake" if index % 50 == 49 else CYCLE[index % len(CYCLE)])
        self._last_op = None
        try:
            self._handlers[write.kind](self, write)
        except redis.ResponseError as exc:
            write.path, write.error = "refused", str(exc)
        except Exception as exc:  # noqa: BLE001 - the app saw the failure: not silent, but not captured
            write.path, write.error = "failed", f"{type(exc).__name__}: {exc}"
        else:
            write.path = "captured" if write.op is not None else "direct"
            for total, amount in write.adds:
                self.ledger.totals[total] += amount
        self.ledger.writes.append(write)
        return write

    def hot_write(self, index: int, slot: int) -> Write:
        """Write the price of hot key ``slot`` (``index`` makes the value unique), recorded."""
        write = Write(index, "price")
        self._last_op = None
        key, value = f"price:{slot}", f"{index}:{time.time():.6f}"
        try:
            self.r.set(key, value)
        except Exception as exc:  # noqa: BLE001 - seen by the accounting as a failed write
            write.path, write.error = "failed", f"{type(exc).__name__}: {exc}"
        else:
            write.path = "captured" if self._last_op is not None else "direct"
            write.op = self._last_op
            self.ledger.latest[key] = value.encode()
        latest = self.ledger.latest
        write.value = value.encode()
        write.probe, write.expect = ("GET", key), lambda reply: reply == latest.get(key)
        self.ledger.writes.append(write)
        return write

    # -- the handlers ----------------------------------------------------------------------

    def _after(self, write: Write) -> None:
        write.op = self._last_op

    def _cache(self, write: Write) -> None:
        key = f"cache:profile:{write.index}"
        value = json.dumps({"id": write.index, "name": f"user {write.index}", "plan": "pro"})
        write.expires_at_ms = int(time.time() * 1000) + CACHE_TTL * 1000
        self.r.set(key, value, ex=CACHE_TTL)
        self._after(write)
        encoded = value.encode()
        write.probe, write.expect = ("GET", key), lambda reply: reply == encoded

    def _profile(self, write: Write) -> None:
        key = f"user:{write.index}"
        fields = {"name": f"user {write.index}", "plan": self.rng.choice(("free", "pro")), "v": write.index}
        self.r.hset(key, mapping=fields)  # type: ignore[arg-type]
        self._after(write)
        expected = {k.encode(): str(v).encode() for k, v in fields.items()}
        write.probe, write.expect = ("HGETALL", key), lambda reply, e=expected: reply == e

    def _views(self, write: Write) -> None:
        key, amount = f"stats:views:{self.rng.choice(PAGES)}", self.rng.randint(1, 9)
        self.r.incrby(key, amount)
        self._after(write)
        write.adds.append((("GET", key, ""), amount))

    def _logout(self, write: Write) -> None:
        key = f"session:{write.index}"
        # The explicit guard, on the plain client: the op to publish is spelled out.
        op = ops.delete(key)
        with celery_redis_retry.on_failure(op, source="SessionStore.end") as guard:
            self.plain.delete(key)
        write.op = op if guard.op_id else None  # the published copy has the same id and commands
        write.probe, write.expect = ("EXISTS", key), lambda reply: reply == 0

    def _order(self, write: Write) -> None:
        order = write.index
        with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(f"order:{order}", mapping={"total": order % 97 + 1, "status": "paid"})
            pipe.sadd("orders:recent", order)
            pipe.incrby("orders:count", 1)
            pipe.execute()
        self._after(write)
        write.adds += [(("GET", "orders:count", ""), 1), (("SISMEMBER", "orders:recent", str(order)), 1)]
        expected = {b"total": str(order % 97 + 1).encode(), b"status": b"paid"}
        write.probe, write.expect = ("HGETALL", f"order:{order}"), lambda reply, e=expected: reply == e

    def _points(self, write: Write) -> None:
        player, points = self.rng.choice(PLAYERS), self.rng.randint(1, 50)
        self.award_points(keys=["leaderboard"], args=[points, player])
        self._after(write)
        write.adds.append((("ZSCORE", "leaderboard", player), points))

    def _mistake(self, write: Write) -> None:
        if write.index % 100 == 49:
            # A bug: the feed is a string. Redis up: WRONGTYPE at once. Redis down: captured, then dead.
            write.dlq = ("dead", "wrong_type")  # Redis refuses the replay
            write.probe, write.expect = ("TYPE", LEGACY_FEED), lambda reply: reply == b"string"
            self.r.rpush(LEGACY_FEED, f"item {write.index}")
            self._after(write)
            return
        # A script of the web app's new release that the workers do not have yet (see app.py):
        # applied directly while Redis is up; once captured, the bridge can only reject it.
        key = f"rank:v2:{write.index}"
        write.dlq = ("rejected", "unknown_script")  # the bridge refuses it
        self.rank_v2(keys=[key], args=[write.index])
        self._after(write)
        write.probe = ("EXISTS", key)
        applied = 0 if write.op is not None else 1
        write.expect = lambda reply: reply == applied

    _handlers: ClassVar[dict[str, Callable[[WebApp, Write], None]]] = {
        "cache": _cache,
        "profile": _profile,
        "views": _views,
        "logout": _logout,
        "order": _order,
        "points": _points,
        "mistake": _mistake,
    }
