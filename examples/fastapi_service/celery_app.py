"""The service's Celery app, with celery_redis_retry installed; settings from the environment.

The web process only publishes captured writes; the replay side runs as::

    celery -A fastapi_service.celery_app worker -Q redis-retry
    celery -A fastapi_service.celery_app redis-retry bridge
"""

from __future__ import annotations

import os

from celery import Celery

import celery_redis_retry

env = os.environ
# Unset (None) means the library's default topic, consumer group and spool path.
_OPTIONAL = ("topic", "consumer_group", "spool_path")

app = Celery("fastapi_service", broker=env.get("CELERY_BROKER_URL", "redis://127.0.0.1:6394/0"))
app.conf.update(
    broker_connection_retry_on_startup=True,
    redis_retry_kafka={"bootstrap.servers": env.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")},
    redis_retry_targets={"default": env.get("SESSIONS_REDIS_URL", "redis://127.0.0.1:6393/0")},
    # Retry for about a minute (0.5, 1, 2 ... 8 s) before an op goes to the DLQ.
    redis_retry_max_retries=10,
    redis_retry_backoff=0.5,
    redis_retry_backoff_max=8.0,
    **{f"redis_retry_{name}": env.get(f"REDIS_RETRY_{name.upper()}") for name in _OPTIONAL},
)
celery_redis_retry.install(app)
