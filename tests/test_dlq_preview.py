"""The dry run's verdicts agree with what the replay then does, on a real redis-server.

Each case writes newer values through ``wrap()`` (stamped, as the application's writes
are), asks :func:`preview` about an older op, checks that it wrote nothing, then replays
the same op with the workers' :class:`Executor`: "would be superseded" must end
``superseded``, "would apply" ``applied``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import pytest
import redis
from test_stamps import _Settings  # a producer's stand-in: a wrapped client reads only its settings

import celery_redis_retry
from celery_redis_retry import ops
from celery_redis_retry.config import Settings
from celery_redis_retry.dlq.admin import DeadLetterQueue, StoredLetter
from celery_redis_retry.dlq.preview import ALREADY_APPLIED, SUPERSEDED, WOULD_APPLY, WOULD_FAIL, preview
from celery_redis_retry.dlq.record import DeadLetter
from celery_redis_retry.ops import RedisOp
from celery_redis_retry.replay.executor import Executor
from celery_redis_retry.testing import RedisServer

pytestmark = pytest.mark.slow


@pytest.fixture
def setup(redis_server: RedisServer) -> Iterator[tuple[Settings, Any, redis.Redis]]:
    settings = Settings.from_mapping({"redis_retry_kafka": {"bootstrap.servers": "127.0.0.1:1"},
                                      "redis_retry_targets": {"default": redis_server.url}})
    client = redis_server.client()
    yield settings, celery_redis_retry.wrap(redis_server.client(), producer=_Settings(settings)), client  # type: ignore[arg-type]
    client.close()


def _older(op: RedisOp) -> RedisOp:
    return msgspec.structs.replace(op, created_at=op.created_at - 1.0)


def _snapshot(r: redis.Redis) -> dict[bytes, Any]:
    return {key: r.dump(key) for key in r.keys("*")}


CASES: list[tuple[str, Callable[[Any], Any], RedisOp, str]] = [
    ("an overwrite after a newer write", lambda w: w.set("name", "new"), ops.set("name", "old"), SUPERSEDED),
    ("an overwrite of a key nobody wrote since", lambda w: None, ops.set("quiet", "v"), WOULD_APPLY),
    ("an increment after newer increments", lambda w: w.incrby("n", 2), ops.incrby("n", 5), WOULD_APPLY),
    ("an increment after a newer overwrite", lambda w: w.set("m", 0), ops.incrby("m", 5), SUPERSEDED),
    ("fields, one rewritten", lambda w: w.hset("h", "b", "new"), ops.hset("h", {"a": "1", "b": "2"}), WOULD_APPLY),
    ("fields, all rewritten", lambda w: w.hset("g", mapping={"a": "x", "b": "y"}), ops.hset("g", {"a": "1", "b": "2"}),
     SUPERSEDED),
    ("fields after the key was deleted", lambda w: w.delete("d"), ops.hset("d", {"c": "x"}), SUPERSEDED),
    ("a value guard that no longer holds", lambda w: w.set("flag", "other"), ops.set("flag", "v2").if_value("v1"),
     SUPERSEDED),
    ("a value guard that holds", lambda w: w.uncaptured.set("flag2", "v1"), ops.set("flag2", "v2").if_value("v1"),
     WOULD_APPLY),
    ("an absent guard on a present key", lambda w: w.set("lock", "x"), ops.set("lock", "y").if_absent(), SUPERSEDED),
    ("a version guard behind", lambda w: w.set("ver", 7), ops.set("doc", "v").if_version(5, key="ver"), SUPERSEDED),
    ("a version guard ahead", lambda w: w.set("ver2", 3), ops.set("doc2", "v").if_version(5, key="ver2"),
     WOULD_APPLY),
    ("a version guard on text", lambda w: w.set("ver3", "abc"), ops.set("doc3", "v").if_version(5, key="ver3"),
     WOULD_FAIL),
    ("a value guard on a hash", lambda w: w.hset("hh", "f", "v"), ops.set("doc4", "v").if_value("v1", key="hh"),
     WOULD_FAIL),
]


@pytest.mark.parametrize(("case", "newer", "op", "verdict"), CASES, ids=[c[0] for c in CASES])
def test_the_preview_says_what_the_replay_then_does(
    setup: tuple[Settings, Any, redis.Redis], case: str, newer: Callable[[Any], Any], op: RedisOp, verdict: str,
) -> None:
    settings, wrapped, r = setup
    newer(wrapped)
    stored = StoredLetter(0, 7, 0, DeadLetter(outcome="dead", reason="retries_exhausted", op=_older(op)))
    before = _snapshot(r)
    [(_, said, detail)] = preview(settings, [stored])
    assert _snapshot(r) == before, "the preview wrote to the target"
    assert said == verdict, (case, detail)
    [(_, copy, _raw)], _ = DeadLetterQueue(settings).check([stored])
    if verdict == WOULD_FAIL:
        with pytest.raises(redis.ResponseError, match=r"does not hold a number|WRONGTYPE"):
            Executor(settings).run(copy)
        return
    outcome = Executor(settings).run(copy).outcome
    assert outcome == ("superseded" if verdict == SUPERSEDED else "applied"), (case, detail)


def test_a_record_whose_copy_was_applied_already_says_so(setup: tuple[Settings, Any, redis.Redis]) -> None:
    settings, _wrapped, r = setup
    stored = StoredLetter(1, 3, 0, DeadLetter(outcome="dead", reason="retries_exhausted", op=ops.incrby("hits", 1)))
    [(_, copy, _raw)], _ = DeadLetterQueue(settings).check([stored])
    Executor(settings).run(copy)
    [(_, said, _detail)] = preview(settings, [stored])
    assert said == ALREADY_APPLIED
    assert r.get("hits") == b"1"
