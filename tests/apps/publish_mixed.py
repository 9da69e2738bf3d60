"""Publisher process for tests/test_publish_real.py: seeded mixed ops through RetryProducer.

Builds ``--count`` ops deterministically from ``--seed`` with every builder of
``celery_redis_retry.ops`` (binary, empty and unicode values, huge integers, infinite
scores, pipelines, scripts, every ``with_*`` copy), publishes them in order with one
:class:`RetryProducer`, closes it, and pickles the ops (as plain field dicts, in publish
order) to ``--out`` with what the producer reports. Keys come from a small pool on
purpose, so many ops share a Kafka message key and per-key order means something.

Exit code 0 only if every op was handed to Kafka and nothing was spooled.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import random
import sys
from typing import Any

import msgspec
import redis.exceptions

from celery_redis_retry import ops
from celery_redis_retry.capture.producer import RetryProducer
from celery_redis_retry.config import Settings
from celery_redis_retry.ops import Arg, RedisOp

#: A small pool: str, unicode, binary (not UTF-8), with NUL, empty and integer keys.
KEYS: tuple[Arg, ...] = (
    *(f"user:{n}:profile" for n in range(12)),
    *(f"session:{n}" for n in range(6)),
    "é€😀:ключ", "日本語:キー", "", "with space and \x00 nul",
    b"\xff\xfe\x80bin", b"bin:\x00\x01\x02", b"", b"plain-bytes-key", b"\xc3\x28invalid-utf8",
    7, 123456789012345678901234567890,
)
TARGETS = ("default", "sessions")
ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ReadOnlyError,
    redis.exceptions.BusyLoadingError, ConnectionRefusedError,
)


class Generator:
    """Every kind of op, drawn from one seeded ``random.Random``."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def key(self) -> Arg:
        return self.rng.choice(KEYS)

    def value(self) -> Arg:
        rng = self.rng
        kind = rng.randrange(10)
        if kind == 0:
            return rng.randbytes(rng.randrange(1, 48))  # mostly not UTF-8
        if kind == 1:
            return rng.choice((b"", "", b"\x00", "\x00"))
        if kind == 2:
            return rng.choice(("é€😀", "日本語テキスト", "ключ-значение", "\u2028line\u2029sep", "tab\tquote\"\\"))
        if kind == 3:
            return rng.choice((0, -1, 2**63 - 1, 2**63, -(2**63) - 1, 10**40, -(10**40)))
        if kind == 4:
            return rng.choice((0.0, -0.0, 0.1, 1.0, 1e16, 5e-324, 1.7976931348623157e308, math.inf, -math.inf))
        if kind == 5:
            return rng.randint(-(10**9), 10**9)
        return "".join(rng.choice("abcdefghij0123456789:-_ ") for _ in range(rng.randrange(1, 60)))

    def values(self, low: int = 1, high: int = 4) -> list[Arg]:
        return [self.value() for _ in range(self.rng.randint(low, high))]

    def amount(self) -> int:
        return self.rng.choice((1, 60, 3600, 86_400, self.rng.randint(1, 10**6)))

    def command(self) -> RedisOp:
        """One plain command op from any builder (no pipeline, no script)."""
        rng = self.rng
        key = self.key()
        choice = rng.randrange(16)
        if choice == 0:
            expiry = rng.choice(("ex", "px", "exat", "pxat", "keepttl", None))
            kwargs: dict[str, Any] = {}
            if expiry == "keepttl":
                kwargs["keepttl"] = True
            elif expiry is not None:
                kwargs[expiry] = self.amount() if expiry in ("ex", "px") else 1_900_000_000 + self.amount()
            condition = rng.choice(("nx", "xx", None))
            if condition is not None:
                kwargs[condition] = True
            return ops.set(key, self.value(), **kwargs)
        if choice == 1:
            return ops.delete(key, *(self.key() for _ in range(rng.randrange(3))))
        if choice == 2:
            mapping = {self.value(): self.value() for _ in range(rng.randint(1, 4))}
            return ops.hset(key, mapping=mapping)
        if choice == 3:
            return ops.hset(key, self.value(), self.value())
        if choice == 4:
            return ops.hdel(key, *self.values())
        if choice == 5:
            return ops.sadd(key, *self.values())
        if choice == 6:
            return ops.srem(key, *self.values())
        if choice == 7:
            scores = (rng.uniform(-1e6, 1e6), math.inf, -math.inf, 0.0, rng.randint(-100, 100))
            mapping = {self.value(): rng.choice(scores) for _ in range(rng.randint(1, 4))}
            return ops.zadd(key, mapping, nx=rng.random() < 0.2, ch=rng.random() < 0.3)
        if choice == 8:
            flag = rng.choice(("nx", "xx", "gt", "lt", None))
            return ops.expire(key, self.amount(), **({flag: True} if flag else {}))
        if choice == 9:
            return ops.incrby(key, rng.choice((1, -1, rng.randint(-(10**6), 10**6), 2**64 + 1, -(10**30))))
        if choice == 10:
            return ops.lpush(key, *self.values())
        if choice == 11:
            return ops.rpush(key, *self.values())
        if choice == 12:
            return ops.command("HINCRBY", key, self.value(), rng.randint(-1000, 1000))
        if choice == 13:
            return ops.command("PFADD", key, *self.values())
        if choice == 14:
            return ops.command("XADD", key, "*", self.value(), self.value())
        which = rng.randrange(3)
        if which == 0:
            return ops.command("setex", key, self.amount(), self.value())  # becomes SET ... PXAT
        if which == 1:
            return ops.command("ZINCRBY", key, rng.choice((rng.uniform(-5, 5), math.inf, 3)), self.value())
        return ops.command("hincrbyfloat", key, self.value(), rng.uniform(-5, 5))

    def op(self) -> RedisOp:
        rng = self.rng
        kind = rng.randrange(10)
        if kind < 7:
            op = self.command()
        elif kind < 9:
            op = ops.pipeline([self.command() for _ in range(rng.randint(1, 5))], transaction=rng.random() < 0.5)
        else:
            op = ops.script(
                rng.choice(("rate_limit", "cas", "ünïcode-script")),
                keys=[self.key() for _ in range(rng.randint(1, 3))],
                args=self.values(0, 3),
            )
        return self.decorate(op)

    def decorate(self, op: RedisOp) -> RedisOp:
        rng = self.rng
        if rng.random() < 0.5:
            extra = {"tenant": rng.choice(("acme", "ünïcode", "")), "n": rng.randint(0, 9)}
            if rng.random() < 0.7:
                extra = {}
            op = op.with_context(trace_id=f"{rng.getrandbits(128):032x}", user_uuid=rng.choice((None, "u-1")), **extra)
        if rng.random() < 0.5:
            op = op.with_source(rng.choice(("UserRepo.save", "SessionStore.touch", "Cart.ádd")))
        if rng.random() < 0.3:
            op = op.with_error(rng.choice(ERRORS)(rng.choice(("Connection refused", "LOADING", "READONLY é"))))
        if rng.random() < 0.2:
            op = op.with_deadline(rng.choice((30, 3600, 0.25)))
        if rng.random() < 0.2:
            op = op.with_max_retries(rng.randint(0, 20))
        if rng.random() < 0.2:
            op = op.with_target(rng.choice(TARGETS))
        return op


def plain(op: RedisOp) -> dict[str, Any]:
    """The op's fields as picklable values (``context`` is a read-only proxy)."""
    fields = msgspec.structs.asdict(op)
    fields["context"] = dict(op.context)
    return fields


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--spool", required=True, help="redis_retry_spool_path")
    parser.add_argument("--out", required=True, help="pickle of the published ops, in publish order")
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    generator = Generator(args.seed)
    built = [generator.op() for _ in range(args.count)]
    producer = RetryProducer(
        Settings.from_mapping(
            {
                "redis_retry_kafka": {"bootstrap.servers": args.bootstrap},
                # Never contacted: publishing only checks that the op's target is known.
                "redis_retry_targets": dict.fromkeys(TARGETS, "redis://127.0.0.1:1/0"),
                "redis_retry_topic": args.topic,
                "redis_retry_spool_path": args.spool,
                # publish() refuses scripts that are not registered: register the ones used.
                "redis_retry_scripts": dict.fromkeys(("rate_limit", "cas", "ünïcode-script"), "return 1"),
            }
        )
    )
    ids = [producer.publish(op) for op in built]
    left = producer.close(timeout=30.0)
    report = {
        "published": producer.stats.published,
        "undelivered_at_close": left,
        "spooled": producer.stats.spooled,
        "delivery_failures": producer.stats.delivery_failures,
        "spool_count": producer.spool.count(),
        "ids_match": ids == [op.id for op in built],
    }
    producer.spool.close()
    with open(args.out, "wb") as out:
        pickle.dump({"ops": [plain(op) for op in built], "report": report}, out, protocol=pickle.HIGHEST_PROTOCOL)
    print(json.dumps(report), flush=True)
    clean = report["published"] == args.count and report["ids_match"] and not (
        left or report["spooled"] or report["delivery_failures"] or report["spool_count"]
    )
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
