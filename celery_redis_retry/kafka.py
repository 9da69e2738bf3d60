"""Kafka plumbing: the only module that imports confluent_kafka.

It owns the librdkafka settings this project relies on (idempotent producer, manual
offset storage for the bridge...) so that they are chosen in one place and explained
once, plus the embedded development broker behind ``celery-redis-retry dev-kafka``.
User settings from ``redis_retry_kafka`` are applied on top of the defaults here, except
for the few that correctness depends on, which are forced (see :data:`FORCED_CONSUMER`).
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

__all__ = [
    "OFFSET_BEGINNING",
    "OFFSET_END",
    "Consumer",
    "EmbeddedBroker",
    "KafkaError",
    "KafkaException",
    "Message",
    "Producer",
    "TopicPartition",
    "consumer_config",
    "iter_topic",
    "new_consumer",
    "new_producer",
    "producer_config",
    "serve_dev_broker",
]

logger = logging.getLogger(__name__)

#: Producer defaults: no loss and no reordering inside librdkafka.
PRODUCER_DEFAULTS: Mapping[str, Any] = {
    # Idempotence gives acks=all, ordered retries and no duplicates from librdkafka's
    # own resends; it is what makes "one key's ops stay in order" true under errors.
    "enable.idempotence": True,
    "acks": "all",
    "compression.type": "lz4",
    # A few ms of batching costs nothing next to the Redis outage being recorded, and
    # keeps throughput high when thousands of writes fail at once.
    "linger.ms": 5,
    # How long librdkafka keeps trying before a delivery report fails and the op goes
    # to the spool instead (librdkafka's default is 5 minutes).
    "message.timeout.ms": 30_000,
}

#: Consumer defaults for the bridge and the operator commands.
CONSUMER_DEFAULTS: Mapping[str, Any] = {
    "auto.offset.reset": "earliest",
    "enable.auto.commit": True,
    "auto.commit.interval.ms": 1000,
    "partition.assignment.strategy": "cooperative-sticky",
    # librdkafka's default (1000 ms) quarters consumer throughput on a backlog.
    "fetch.queue.backoff.ms": 20,
    # Bound the pre-fetch buffer (64 MiB by default): a bridge reads a backlog in
    # batches; it never needs more than a few MiB ahead to stay busy.
    "queued.max.messages.kbytes": 4096,
    "fetch.max.bytes": 2 * 1024 * 1024,
    "max.partition.fetch.bytes": 512 * 1024,
    # A bridge started before the first op was published must still find the topic
    # (librdkafka looks again only every 5 minutes by default).
    "allow.auto.create.topics": True,
    "topic.metadata.refresh.interval.ms": 10_000,
}

#: Forced for the bridge: an offset is stored only once Celery accepted the op, so the
#: periodic auto-commit can never commit past an op that was not handed over.
FORCED_CONSUMER: Mapping[str, Any] = {"enable.auto.offset.store": False}

# Keys that only make sense for one client type; stripping them keeps librdkafka quiet.
_PRODUCER_ONLY = frozenset(
    ("enable.idempotence", "acks", "compression.type", "linger.ms", "message.timeout.ms",
     "queue.buffering.max.messages", "queue.buffering.max.kbytes", "batch.size", "delivery.report.only.error",
     "retries", "retry.backoff.ms", "max.in.flight.requests.per.connection", "transactional.id")
)
_CONSUMER_ONLY = frozenset(
    ("group.id", "auto.offset.reset", "enable.auto.commit", "auto.commit.interval.ms", "enable.auto.offset.store",
     "partition.assignment.strategy", "session.timeout.ms", "max.poll.interval.ms", "fetch.queue.backoff.ms",
     "heartbeat.interval.ms", "isolation.level", "group.instance.id", "fetch.min.bytes", "fetch.wait.max.ms",
     "allow.auto.create.topics", "queued.max.messages.kbytes", "fetch.max.bytes", "max.partition.fetch.bytes")
)


def producer_config(user: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """librdkafka producer settings: defaults, then ``redis_retry_kafka``, then ``overrides``."""
    conf = {**PRODUCER_DEFAULTS, **{k: v for k, v in user.items() if k not in _CONSUMER_ONLY}, **overrides}
    conf.setdefault("logger", logging.getLogger("celery_redis_retry.librdkafka"))
    return conf


def consumer_config(user: Mapping[str, Any], group_id: str, **overrides: Any) -> dict[str, Any]:
    """librdkafka consumer settings for ``group_id`` (see :data:`FORCED_CONSUMER`)."""
    conf = {
        **CONSUMER_DEFAULTS,
        **{k: v for k, v in user.items() if k not in _PRODUCER_ONLY},
        "group.id": group_id,
        **overrides,
    }
    conf.setdefault("logger", logging.getLogger("celery_redis_retry.librdkafka"))
    return conf


def new_producer(user: Mapping[str, Any], **overrides: Any) -> Producer:
    """A confluent-kafka Producer built with :func:`producer_config`."""
    return Producer(producer_config(user, **overrides))


def new_consumer(user: Mapping[str, Any], group_id: str, **overrides: Any) -> Consumer:
    """A confluent-kafka Consumer built with :func:`consumer_config`."""
    return Consumer(consumer_config(user, group_id, **overrides))


def iter_topic(
    user: Mapping[str, Any], topic: str, *, timeout: float = 10.0, idle: float = 2.0
) -> Iterator[Message]:
    """Every message of ``topic`` from the beginning, without joining or committing a group.

    Stops after ``idle`` seconds without a new message, or after ``timeout`` seconds.
    Used by operator commands and tests that read a topic back.
    """
    consumer = new_consumer(
        user, f"celery-redis-retry-reader-{os.getpid()}-{time.monotonic_ns()}", **{"enable.auto.commit": False}
    )
    try:
        metadata = consumer.list_topics(topic, timeout=timeout)
        partitions = metadata.topics[topic].partitions if topic in metadata.topics else {}
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        deadline = time.monotonic() + timeout
        last_seen = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - last_seen < idle:
            for message in consumer.consume(1000, timeout=0.2):
                error = message.error()
                if error is None:
                    last_seen = time.monotonic()
                    yield message
                elif error.code() != KafkaError._PARTITION_EOF:
                    raise KafkaException(error)
    finally:
        consumer.close()


class EmbeddedBroker:
    """librdkafka's mock cluster, running inside this process, as a real Kafka broker.

    Other processes connect to :attr:`bootstrap_servers` like to any broker; topics are
    created on first use with 4 partitions. It keeps data in memory only, and about the
    newest 5 MiB per partition: for development, demos and tests, never production.
    """

    def __init__(self) -> None:
        self._handle: Producer | None = Producer(
            {
                "test.mock.num.brokers": 1,
                "bootstrap.servers": "unused:1",
                "logger": logging.getLogger("celery_redis_retry.dev_kafka"),
            }
        )
        brokers = Producer.list_topics(self._handle, timeout=10).brokers.values()
        self.bootstrap_servers = ",".join(f"{b.host}:{b.port}" for b in brokers)

    def close(self) -> None:
        """Stop serving (the mock cluster dies with its handle)."""
        self._handle = None


def serve_dev_broker(bootstrap_file: str | None = None) -> None:
    """Run an :class:`EmbeddedBroker` until SIGINT or SIGTERM; print its address first."""
    stop = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    broker = EmbeddedBroker()
    line = f"bootstrap.servers={broker.bootstrap_servers}"
    print(line, flush=True)
    if bootstrap_file:
        folder = os.path.dirname(os.path.abspath(bootstrap_file))
        with tempfile.NamedTemporaryFile("w", dir=folder, delete=False) as out:
            out.write(broker.bootstrap_servers + "\n")
        os.replace(out.name, bootstrap_file)  # readers never see a half-written file
    try:
        received = signal.sigwait(stop)
        logger.info("dev-kafka: %s received, stopping", signal.Signals(received).name)
    finally:
        broker.close()
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
