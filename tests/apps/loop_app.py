"""A Celery app configured from the environment, for the real-process loop tests.

CRR_BROKER_URL     the Celery broker (a test redis-server, or RabbitMQ)
CRR_BOOTSTRAP      Kafka bootstrap servers
CRR_TARGET_URL     the target Redis
CRR_EXTRA_TARGETS  JSON object of more targets (name -> Redis URL)
CRR_MAX_AGE        redis_retry_max_age, in seconds
CRR_TOPIC          the topic (each test uses its own)
CRR_GROUP          the consumer group
CRR_QUEUE          the Celery queue
CRR_MAX_RETRIES, CRR_BACKOFF, CRR_BACKOFF_MAX: retry policy
CRR_BATCH_SIZE     ops per replay task (1: one task per op)
CRR_HIGH_WATER     Celery queue length at which the bridge stops reading Kafka
CRR_KAFKA_EXTRA    JSON object of extra librdkafka settings (fast group joins in tests)
CRR_SPOOL          the producer spool file
CRR_VISIBILITY_TIMEOUT  Redis broker redelivery delay for tasks held by a dead worker
CRR_KILL_AFTER_APPLY    probability of SIGKILLing a worker child after a replay applied
CRR_WORKER_METRICS_PORT where the worker serves Prometheus metrics
CRR_COMMIT_AFTER   redis_retry_commit_after ("end" or "handover")
CRR_REDELIVERY_TIMEOUT  redis_retry_redelivery_timeout, in seconds
CRR_SIGNING_KEYS   JSON object of redis_retry_signing_keys (key id -> secret)
CRR_LOG_FORMAT     redis_retry_log_format ("text" or "json")
CRR_SPANS_FILE     OpenTelemetry: record spans, one JSON object per line, in this file
"""

from __future__ import annotations

import json
import os

from celery import Celery
from loop_scripts import SCRIPTS

import celery_redis_retry

env = os.environ

if env.get("CRR_SPANS_FILE"):
    # As an application with OpenTelemetry configures it; spans go to a file the test reads.
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    class _SpansToFile(SpanExporter):
        def export(self, spans):  # type: ignore[no-untyped-def]
            with open(env["CRR_SPANS_FILE"], "a") as out:
                for span in spans:
                    context, parent = span.get_span_context(), span.parent
                    out.write(json.dumps({
                        "name": span.name, "trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}",
                        "parent_id": f"{parent.span_id:016x}" if parent else None, "attributes": dict(span.attributes),
                    }) + "\n")
            return SpanExportResult.SUCCESS

    _provider = TracerProvider()
    _provider.add_span_processor(SimpleSpanProcessor(_SpansToFile()))
    trace.set_tracer_provider(_provider)

app = Celery("loop_app", broker=env["CRR_BROKER_URL"])
app.conf.update(
    broker_connection_retry_on_startup=True,
    # Redis brokers redeliver tasks a dead worker held only after visibility_timeout, found
    # by a sweep every unacked_restore_interval * unacked_restore_throttle seconds.
    broker_transport_options={
        "visibility_timeout": int(env.get("CRR_VISIBILITY_TIMEOUT", "3600")),
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    },
    worker_prefetch_multiplier=int(env.get("CRR_PREFETCH", "4")),
    task_default_queue="default-not-used",
    redis_retry_kafka={"bootstrap.servers": env["CRR_BOOTSTRAP"], **json.loads(env.get("CRR_KAFKA_EXTRA", "{}"))},
    redis_retry_spool_path=env.get("CRR_SPOOL"),
    redis_retry_targets={"default": env["CRR_TARGET_URL"], **json.loads(env.get("CRR_EXTRA_TARGETS", "{}"))},
    redis_retry_max_age=int(env["CRR_MAX_AGE"]) if env.get("CRR_MAX_AGE") else None,
    redis_retry_topic=env.get("CRR_TOPIC", "redis-retry-queue"),
    redis_retry_dlq_topic=env.get("CRR_DLQ_TOPIC"),
    redis_retry_consumer_group=env.get("CRR_GROUP", "redis-retry-consumer-group"),
    redis_retry_queue=env.get("CRR_QUEUE", "redis-retry"),
    redis_retry_max_retries=int(env.get("CRR_MAX_RETRIES", "3")),
    redis_retry_backoff=float(env.get("CRR_BACKOFF", "0.5")),
    redis_retry_backoff_max=float(env.get("CRR_BACKOFF_MAX", "4")),
    redis_retry_scripts=SCRIPTS,
    redis_retry_signing_keys=json.loads(env.get("CRR_SIGNING_KEYS", "{}")),
    redis_retry_batch_size=int(env.get("CRR_BATCH_SIZE", "100")),
    redis_retry_queue_high_water=int(env.get("CRR_HIGH_WATER", "500")),
    redis_retry_commit_after=env.get("CRR_COMMIT_AFTER", "end"),
    redis_retry_redelivery_timeout=float(env.get("CRR_REDELIVERY_TIMEOUT", "300")),
    redis_retry_worker_metrics_port=int(env["CRR_WORKER_METRICS_PORT"]) if env.get("CRR_WORKER_METRICS_PORT") else None,
    redis_retry_log_format=env.get("CRR_LOG_FORMAT", "text"),
)
celery_redis_retry.install(app)

# Chaos for the exactly-once tests: SIGKILL the worker child right after a replay applied
# its op and before the task is acknowledged (the parent acks when the child reports).
KILL_AFTER_APPLY = float(env.get("CRR_KILL_AFTER_APPLY", "0"))
if KILL_AFTER_APPLY:
    import random
    import signal

    from celery.signals import task_postrun

    @task_postrun.connect
    def _kill_after_apply(task: object = None, state: str | None = None, **_: object) -> None:
        replayed = getattr(task, "name", "").startswith("celery_redis_retry.replay") and state == "SUCCESS"
        if replayed and random.random() < KILL_AFTER_APPLY:
            os.kill(os.getpid(), signal.SIGKILL)
