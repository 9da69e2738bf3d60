"""The Celery app of the benchmarks, configured from environment variables.

Subprocesses load it as ``celery -A bench_app`` with ``PYTHONPATH=benchmarks/apps``; a
benchmark builds the same app in its own process with :func:`make_app` and the same
environment, so both sides of a comparison run with identical settings.

CRR_BENCH_BROKER_URL    the Celery broker (a redis-server the benchmark started, or RabbitMQ)
CRR_BENCH_CONFIRM       "1"/"0": force ``confirm_publish`` on/off for amqp (unset: the bridge's
                        own choice, which is on)
CRR_BENCH_BOOTSTRAP     Kafka bootstrap servers
CRR_BENCH_KAFKA_EXTRA   JSON object of extra librdkafka settings (fast consumer-group joins)
CRR_BENCH_TARGET_URL    the target Redis ops are replayed on
CRR_BENCH_TOPIC, CRR_BENCH_GROUP, CRR_BENCH_QUEUE, CRR_BENCH_SPOOL
CRR_BENCH_PREFETCH      worker_prefetch_multiplier (Celery's default: 4)
CRR_BENCH_BATCH_SIZE    -> ``redis_retry_batch_size`` (1: one task per op; unset: the package default)
CRR_BENCH_BATCH_LINGER_MS -> ``redis_retry_batch_linger_ms`` (unset: the package default)
CRR_BENCH_HIGH_WATER    -> ``redis_retry_queue_high_water`` (0: the bridge never pauses; unset: the default)
CRR_BENCH_COMMIT_AFTER  -> ``redis_retry_commit_after`` ("end" or "handover"; unset: the default)
CRR_BENCH_MAX_IN_FLIGHT -> ``redis_retry_max_in_flight`` (unset: the default)
CRR_BENCH_TARGETS       JSON object of more targets (name -> URL) beside "default" (CRR_BENCH_TARGET_URL)
CRR_BENCH_WRITE_STAMPS  "1"/"0" -> ``redis_retry_write_stamps`` (unset: the default, on)
CRR_BENCH_SIGNING_KEY   a secret of >= 16 bytes -> ``redis_retry_signing_keys`` ``{"bench": key}`` (unset: none)

Besides the package's own tasks it registers the "raw Celery" baselines, with the same
task options as ``celery_redis_retry.replay`` (late ack, no result) and a per-process
redis-py client: ``bench.raw_command`` (one ``execute_command`` per task) and
``bench.raw_pipeline`` (a list of commands in one non-transactional pipeline).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import redis
from celery import Celery

import celery_redis_retry

RAW_COMMAND_TASK = "bench.raw_command"
RAW_PIPELINE_TASK = "bench.raw_pipeline"


def make_app(env: Mapping[str, str], name: str = "bench_app") -> Celery:
    """A Celery app with the package installed and ``bench.raw_command`` registered."""
    broker_url = env["CRR_BENCH_BROKER_URL"]
    transport: dict[str, Any] = {}
    if urlsplit(broker_url).scheme in ("redis", "rediss"):
        transport["visibility_timeout"] = 3600
    if env.get("CRR_BENCH_CONFIRM") in ("0", "1"):
        transport["confirm_publish"] = env["CRR_BENCH_CONFIRM"] == "1"
    queue = env.get("CRR_BENCH_QUEUE", "redis-retry")
    app = Celery(name, broker=broker_url, set_as_current=False)
    app.conf.update(
        broker_connection_retry_on_startup=True,
        broker_transport_options=transport,
        worker_prefetch_multiplier=int(env.get("CRR_BENCH_PREFETCH", "4")),
        task_default_queue=queue,
        redis_retry_kafka={
            "bootstrap.servers": env["CRR_BENCH_BOOTSTRAP"], **json.loads(env.get("CRR_BENCH_KAFKA_EXTRA", "{}"))
        },
        redis_retry_targets={"default": env["CRR_BENCH_TARGET_URL"], **json.loads(env.get("CRR_BENCH_TARGETS", "{}"))},
        redis_retry_topic=env.get("CRR_BENCH_TOPIC", "redis-retry-queue"),
        redis_retry_consumer_group=env.get("CRR_BENCH_GROUP", "redis-retry-consumer-group"),
        redis_retry_queue=queue,
        redis_retry_spool_path=env.get("CRR_BENCH_SPOOL"),
    )
    # Unset: the package's defaults (batched replay).
    if env.get("CRR_BENCH_BATCH_SIZE"):
        app.conf.redis_retry_batch_size = int(env["CRR_BENCH_BATCH_SIZE"])
    if env.get("CRR_BENCH_BATCH_LINGER_MS"):
        app.conf.redis_retry_batch_linger_ms = int(env["CRR_BENCH_BATCH_LINGER_MS"])
    if env.get("CRR_BENCH_HIGH_WATER"):
        app.conf.redis_retry_queue_high_water = int(env["CRR_BENCH_HIGH_WATER"])
    if env.get("CRR_BENCH_COMMIT_AFTER"):
        app.conf.redis_retry_commit_after = env["CRR_BENCH_COMMIT_AFTER"]
    if env.get("CRR_BENCH_MAX_IN_FLIGHT"):
        app.conf.redis_retry_max_in_flight = int(env["CRR_BENCH_MAX_IN_FLIGHT"])
    if env.get("CRR_BENCH_WRITE_STAMPS") in ("0", "1"):
        app.conf.redis_retry_write_stamps = env["CRR_BENCH_WRITE_STAMPS"] == "1"
    if env.get("CRR_BENCH_SIGNING_KEY"):
        app.conf.redis_retry_signing_keys = {"bench": env["CRR_BENCH_SIGNING_KEY"]}
    celery_redis_retry.install(app)
    target_url = env["CRR_BENCH_TARGET_URL"]
    clients: dict[int, redis.Redis] = {}

    def target() -> redis.Redis:
        # One client (and pool) per process: created after the prefork fork, like the package's.
        client = clients.get(os.getpid())
        if client is None:
            client = clients[os.getpid()] = redis.Redis.from_url(target_url)
        return client

    @app.task(name=RAW_COMMAND_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def raw_command(*command: Any) -> None:
        target().execute_command(*command)

    @app.task(name=RAW_PIPELINE_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def raw_pipeline(commands: list[list[Any]]) -> None:
        pipe = target().pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        pipe.execute()

    return app


app = make_app(os.environ) if "CRR_BENCH_BROKER_URL" in os.environ else None
