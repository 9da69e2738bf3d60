"""A Celery app for tests/test_producer_durability.py, configured from the environment.

CRR_BOOTSTRAP        Kafka bootstrap servers
CRR_TOPIC            the topic ops are published to
CRR_SPOOL            the producer's spool file
CRR_DURABLE          "1" for redis_retry_durable_publish
CRR_BROKER_URL       the Celery broker (only the prefork worker needs a real one)
CRR_OUT_DIR          where publish_range appends what it published, one file per process
CRR_LIBRDKAFKA_STDERR  "1": librdkafka logs straight to stderr (see below)

It is also the app of ``celery -A durability_app redis-retry spool status|drain``.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

import celery_redis_retry
from celery_redis_retry import kafka, ops
from celery_redis_retry.message import encode
from celery_redis_retry.ops import RedisOp

env = os.environ

if env.get("CRR_LIBRDKAFKA_STDERR") == "1":
    # With a Python logger, librdkafka's log lines wait in a queue that only poll()
    # serves, so "Producer terminating with N messages ... still in queue or transit",
    # written when a handle is destroyed, is never seen. Its own stderr logger writes
    # at once: that is how the tests check that no handle is destroyed with ops in it.
    _producer_config = kafka.producer_config

    def _stderr_producer_config(user: Any, **overrides: Any) -> dict[str, Any]:
        conf = _producer_config(user, **overrides)
        conf.pop("logger", None)
        return conf

    kafka.producer_config = _stderr_producer_config

app = Celery("durability_app", broker=env.get("CRR_BROKER_URL", "memory://"))
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
    task_default_queue="durability",
    redis_retry_kafka={"bootstrap.servers": env["CRR_BOOTSTRAP"]},
    # Never contacted: publishing only checks that the op's target is known.
    redis_retry_targets={"default": "redis://127.0.0.1:1/0"},
    redis_retry_topic=env.get("CRR_TOPIC", "redis-retry-queue"),
    redis_retry_spool_path=env["CRR_SPOOL"],
    redis_retry_durable_publish=env.get("CRR_DURABLE") == "1",
)
celery_redis_retry.install(app)


def make_op(n: int) -> RedisOp:
    """Op number ``n``: commands, hashes, pipelines and deletes, with binary values."""
    key = f"durability:{n}"
    kind = n % 4
    if kind == 0:
        op = ops.set(key, n.to_bytes(8, "big") + b"\x00\xff\xfe", ex=3600)
    elif kind == 1:
        op = ops.hset(key, {"n": n, "bin": b"\x80\x81\x00", "text": "é€😀"})
    elif kind == 2:
        op = ops.pipeline([ops.incrby(key, n), ops.expire(key, 600)])
    else:
        op = ops.delete(key)
    return op.with_context(seq=n).with_source("durability_app")


@app.task(name="durability_app.publish_range")
def publish_range(start: int, count: int) -> int:
    """Publish ops ``start .. start + count - 1``; append each, encoded, once publish returned."""
    path = os.path.join(env["CRR_OUT_DIR"], f"published-{os.getpid()}.jsonl")
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for n in range(start, start + count):
            op = make_op(n)
            celery_redis_retry.publish(op)
            os.write(out, encode(op) + b"\n")
    finally:
        os.close(out)
    return count
