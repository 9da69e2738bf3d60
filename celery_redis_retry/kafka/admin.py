"""Topics and consumer groups as the cluster sees them: describe, create, committed offsets.

Used by ``redis-retry topics create|describe`` and ``redis-retry status``; none of it is
on the path of an op.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import (
    KafkaError,
    KafkaException,
    TopicPartition,
)
from confluent_kafka import admin as _admin
from confluent_kafka.admin import AdminClient

from celery_redis_retry.kafka.clients import new_consumer, require_topic, topic_partitions
from celery_redis_retry.kafka.commit_metadata import parse_offsets
from celery_redis_retry.kafka.settings import admin_config

#: A topic to create (confluent_kafka exports it at runtime, but its type stubs do not).
NewTopic: Any = _admin.NewTopic  # type: ignore[attr-defined]


def new_admin(user: Mapping[str, Any]) -> AdminClient:
    """An AdminClient with the connection settings of ``redis_retry_kafka`` (client-type keys dropped)."""
    return AdminClient(admin_config(user))


@dataclass(frozen=True)
class TopicDescription:
    """A topic as the cluster describes it."""

    name: str
    partitions: int
    #: The smallest replica count of its partitions (they are equal unless reassigned).
    replication_factor: int
    #: Its settings (``retention.ms``, ``min.insync.replicas``...), broker defaults included.
    config: Mapping[str, str]


def cluster_brokers(admin: AdminClient, timeout: float = 10.0) -> tuple[int, bool]:
    """How many brokers the cluster has, and whether one of them is its controller.

    The mock cluster names a controller that is none of its brokers: it cannot create
    topics on request (it creates them on first use).
    """
    metadata = admin.list_topics(timeout=timeout)
    return len(metadata.brokers), metadata.controller_id in metadata.brokers


def describe_topics(
    admin: AdminClient, names: list[str], *, timeout: float = 10.0
) -> dict[str, TopicDescription | None]:
    """Each of ``names`` as the cluster describes it, None for a topic that does not exist.

    Asks for the metadata of every topic rather than of these: a request naming a topic
    may create it on a broker that creates topics on use.
    """
    metadata = admin.list_topics(timeout=timeout)
    found = {n: metadata.topics[n] for n in names if n in metadata.topics and metadata.topics[n].error is None}
    configs: dict[str, dict[str, str]] = {}
    if found:
        futures = admin.describe_configs(
            [_admin.ConfigResource("topic", n) for n in found],  # type: ignore[attr-defined]
            request_timeout=timeout,
        )
        for resource, future in futures.items():
            entries = future.result(timeout)
            configs[resource.name] = {k: e.value for k, e in entries.items() if e.value is not None}
    return {
        n: None if n not in found else TopicDescription(
            n, len(found[n].partitions),
            min((len(p.replicas) for p in found[n].partitions.values()), default=0),
            configs.get(n, {}),
        )
        for n in names
    }


def create_topics(
    admin: AdminClient, topics: list[tuple[str, int, int, Mapping[str, str]]], *, timeout: float = 30.0
) -> dict[str, KafkaError | None]:
    """Create ``(name, partitions, replication factor, config)`` topics; the error of each, None once created.

    An existing topic comes back as TOPIC_ALREADY_EXISTS, left as it is.
    """
    new = [NewTopic(name, partitions, replication, config=dict(config)) for name, partitions, replication, config
           in topics]
    futures = admin.create_topics(new, operation_timeout=timeout, request_timeout=timeout)
    result: dict[str, KafkaError | None] = {}
    for name, future in futures.items():
        try:
            future.result(timeout + 5)
            result[name] = None
        except KafkaException as exc:
            result[name] = exc.args[0]
    return result


@dataclass(frozen=True)
class PartitionOffsets:
    """Where a consumer group stands in one partition."""

    low: int  # the oldest offset the broker still keeps
    high: int  # the offset the next message will get
    committed: int  # the group's committed offset, or a negative value when it has none
    metadata: str | None = None  # the metadata committed with it

    @property
    def lag(self) -> int:
        """Messages the group has not committed yet."""
        return max(0, self.high - max(self.committed, self.low))

    @property
    def pending(self) -> int:
        """Messages not dealt with: the lag, less those past the committed offset its metadata lists as done."""
        start = max(self.committed, self.low)
        return max(0, self.lag - sum(1 for o in parse_offsets(self.metadata) if start <= o < self.high))


def group_offsets(
    user: Mapping[str, Any], topic: str, group: str, *, timeout: float = 10.0, must_exist: bool = False
) -> dict[int, PartitionOffsets]:
    """Watermarks and ``group``'s committed offsets for every partition of ``topic``.

    Asks without joining the group, so it never triggers a rebalance of its members. A
    missing topic has no partitions, or with ``must_exist`` raises :class:`TopicMissingError`.
    """
    consumer = new_consumer(user, group, **{"enable.auto.commit": False})
    try:
        numbers = topic_partitions(consumer, topic, timeout)
        if not numbers and must_exist:
            require_topic(consumer, topic, user, timeout=timeout)
        partitions = [TopicPartition(topic, p) for p in numbers]
        committed = {tp.partition: tp for tp in consumer.committed(partitions, timeout=timeout)}
        result = {}
        for tp in partitions:
            low, high = consumer.get_watermark_offsets(tp, timeout=timeout)
            mine = committed[tp.partition]
            result[tp.partition] = PartitionOffsets(low, high, mine.offset, mine.metadata)
        return result
    finally:
        consumer.close()
