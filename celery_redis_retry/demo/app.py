"""The demo's Celery app, configured from ``CRR_DEMO_*`` environment variables.

The worker and the bridge load it as ``celery -A celery_redis_retry.demo.app ...``;
the demo process imports it too, so its ``wrap()``-ed client publishes with the very
settings the workers replay with. Topic, DLQ topic, consumer group and queue keep
their defaults (the embedded Kafka is new on every run).

CRR_DEMO_BROKER_URL    the Celery broker (a redis-server the demo starts)
CRR_DEMO_BOOTSTRAP     Kafka bootstrap servers (the embedded broker)
CRR_DEMO_TARGET_URL    the target Redis the story writes to
CRR_DEMO_SPOOL         the producer's spool file (in the demo's work directory)
CRR_DEMO_WEB_APP       1 in the web app (the demo process), which runs a newer release
"""

from __future__ import annotations

import os

from celery import Celery

import celery_redis_retry
from celery_redis_retry.testing import TEST_CONSUMER_SETTINGS

env = os.environ

#: The scripts the workers may run, by name.
SCRIPTS = {"award_points": "return redis.call('ZINCRBY', KEYS[1], ARGV[1], ARGV[2])"}
if env.get("CRR_DEMO_WEB_APP") == "1":
    # The web app already runs the next release, whose script the workers do not have
    # yet (a rolling deploy): its captured calls can only end in the DLQ.
    SCRIPTS["recompute_rank_v2"] = "return redis.call('SET', KEYS[1], ARGV[1])"

app = Celery("crr-demo", broker=env.get("CRR_DEMO_BROKER_URL", "redis://127.0.0.1:6379/1"))
app.conf.update(
    broker_connection_retry_on_startup=True,
    task_default_queue="crr-demo-default",
    worker_prefetch_multiplier=8,
    redis_retry_kafka={
        "bootstrap.servers": env.get("CRR_DEMO_BOOTSTRAP", "127.0.0.1:9092"),
        # Development settings: fast consumer-group joins on the embedded broker, and
        # the topic, created by the first captured write, is found within a second.
        **TEST_CONSUMER_SETTINGS,
        "topic.metadata.refresh.interval.ms": 1000,
    },
    redis_retry_targets={"default": env.get("CRR_DEMO_TARGET_URL", "redis://127.0.0.1:6379/0")},
    redis_retry_spool_path=env.get("CRR_DEMO_SPOOL"),
    redis_retry_scripts=SCRIPTS,
    # The retry settings keep their defaults: the outage is waited out in Kafka, not in retries.
)
celery_redis_retry.install(app)
