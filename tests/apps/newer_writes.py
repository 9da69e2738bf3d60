"""The writes of the "newer write wins" tests, shared by the test process and its writer processes.

Each kind is written twice per key: ``captured`` while the target is down (the wrapped
client captures it), then ``newer`` once the target is back (it succeeds at once). The
replay of the captured write must leave every key at the newer write, or for counters
at the exact sum of both.

Run as a program it is one writer process::

    python newer_writes.py PHASE COUNT   (PHASE: captured or newer)

configured by loop_app's environment (CRR_TARGET_URL...), printing how many calls it
made and how many were captured.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

#: kind -> (captured write, newer write), each called as f(wrapped_client, i).
WRITES: dict[str, tuple[Callable[[Any, int], Any], Callable[[Any, int], Any]]] = {
    "set": (lambda w, i: w.set(f"s:{i}", "v1"), lambda w, i: w.set(f"s:{i}", "v2")),
    "hset": (lambda w, i: w.hset(f"h:{i}", "f", "v1"), lambda w, i: w.hset(f"h:{i}", "f", "v2")),
    "del-then-set": (lambda w, i: w.delete(f"d:{i}"), lambda w, i: w.set(f"d:{i}", "v2")),
    "set-ex": (lambda w, i: w.set(f"e:{i}", "v1", ex=300), lambda w, i: w.set(f"e:{i}", "v2", ex=300)),
    "incrby": (lambda w, i: w.incrby(f"c:{i}", 1), lambda w, i: w.incrby(f"c:{i}", 2)),
}
#: Kinds whose captured write a newer write supersedes (the counters' replay applies).
SUPERSEDED_KINDS = ("set", "hset", "del-then-set", "set-ex")


def before_outage(client: Any, count: int) -> None:
    """What the keys hold before the outage: the DEL-then-SET keys exist."""
    for i in range(count):
        client.set(f"d:{i}", "v0")


def write(wrapped: Any, phase: str, count: int) -> int:
    """Every kind's ``phase`` write ("captured" or "newer") to ``count`` keys; the number of calls."""
    index = 0 if phase == "captured" else 1
    calls = 0
    for kind in WRITES.values():
        for i in range(count):
            kind[index](wrapped, i)
            calls += 1
    return calls


def wrong_keys(client: Any, count: int) -> dict[str, list[str]]:
    """Per kind, the keys that do not hold what the newer write left (empty lists: all right)."""
    wrong: dict[str, list[str]] = {kind: [] for kind in WRITES}
    for i in range(count):
        if client.get(f"s:{i}") != b"v2":
            wrong["set"].append(f"s:{i}")
        if client.hget(f"h:{i}", "f") != b"v2":
            wrong["hset"].append(f"h:{i}")
        if client.get(f"d:{i}") != b"v2":
            wrong["del-then-set"].append(f"d:{i}")
        if client.get(f"e:{i}") != b"v2" or client.ttl(f"e:{i}") <= 0:
            wrong["set-ex"].append(f"e:{i}")
        if client.get(f"c:{i}") != b"3":
            wrong["incrby"].append(f"c:{i}")
    return wrong


def fast_client(url: str) -> Any:
    """A client that sees a dead target at once: short timeouts, no redis-py retries."""
    options: dict[str, Any] = {"socket_timeout": 1.0, "socket_connect_timeout": 1.0, "retry": Retry(NoBackoff(), 0)}
    if url.startswith("redis+cluster://"):
        from redis.cluster import RedisCluster

        return RedisCluster.from_url(url.replace("redis+cluster://", "redis://", 1), **options)
    return redis.Redis.from_url(url, **options)


def main() -> None:
    import os

    from loop_app import app

    import celery_redis_retry

    phase, count = sys.argv[1], int(sys.argv[2])
    captured: list[str] = []
    producer = celery_redis_retry.RetryProducer.from_app(app)
    wrapped = celery_redis_retry.wrap(
        fast_client(os.environ["CRR_TARGET_URL"]), producer=producer, on_capture=lambda op: captured.append(op.id)
    )
    calls = write(wrapped, phase, count)
    left = producer.flush(30)
    producer.close(10)
    print(json.dumps({"calls": calls, "captured": len(captured), "unflushed": left}))
    sys.exit(0 if left == 0 else 1)


if __name__ == "__main__":
    main()
