"""The service's Celery app, with celery_redis_retry installed.

Settings come from the environment, with defaults for the local setup of
examples/README.md. Run the replay side with::

    celery -A profile_service.celery_app worker -Q redis-retry
    celery -A profile_service.celery_app redis-retry bridge
"""

from __future__ import annotations

import os

from celery import Celery

import celery_redis_retry

env = os.environ

app = Celery("profile_service", broker=env.get("CELERY_BROKER_URL", "redis://127.0.0.1:6392/0"))
app.conf.update(
    broker_connection_retry_on_startup=True,
    # Kafka, where failed writes wait; librdkafka settings go in this dict.
    redis_retry_kafka={"bootstrap.servers": env.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")},
    # The Redis the web app writes to, under the name ops refer to.
    redis_retry_targets={"default": env.get("PROFILE_REDIS_URL", "redis://127.0.0.1:6391/0")},
    # Unset (None) means the default: redis-retry-queue, redis-retry-consumer-group, ~/.local/state/...
    redis_retry_topic=env.get("REDIS_RETRY_TOPIC"),
    redis_retry_consumer_group=env.get("REDIS_RETRY_CONSUMER_GROUP"),
    redis_retry_spool_path=env.get("REDIS_RETRY_SPOOL_PATH"),
    # Retry for about five minutes (1, 2, 4 ... 30 s) before an op goes to the DLQ.
    redis_retry_max_retries=int(env.get("REDIS_RETRY_MAX_RETRIES", "14")),
    redis_retry_backoff=1.0,
    redis_retry_backoff_max=30.0,
    # Where each worker serves its replay outcomes to Prometheus (unset: not served).
    redis_retry_worker_metrics_port=int(env["REDIS_RETRY_WORKER_METRICS_PORT"])
    if env.get("REDIS_RETRY_WORKER_METRICS_PORT") else None,
)
celery_redis_retry.install(app)
