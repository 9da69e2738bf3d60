"""Kafka plumbing: the only package that imports confluent_kafka.

- :mod:`~celery_redis_retry.kafka.settings`: the librdkafka settings this project relies
  on (idempotent producer, manual offset storage for the bridge...), chosen in one place
  and explained once; user settings from ``redis_retry_kafka`` go on top, except the few
  that correctness depends on, which are forced.
- :mod:`~celery_redis_retry.kafka.clients`: building clients, reading a topic to its end,
  producing with confirmation, and telling a refused login from a cluster that is away
  or a topic that is missing.
- :mod:`~celery_redis_retry.kafka.admin`: describing and creating topics, committed offsets.
- :mod:`~celery_redis_retry.kafka.commit_metadata`: the offsets a commit's metadata lists.
- :mod:`~celery_redis_retry.kafka.topics`: the topics a deployment needs, as planned by
  ``redis-retry topics create|describe``.
- :mod:`~celery_redis_retry.kafka.log`: librdkafka's log, told once per state change.
- :mod:`~celery_redis_retry.kafka.dev_broker`: the embedded broker of ``dev-kafka``.

The names most modules need are importable from here (``from celery_redis_retry import
kafka; kafka.new_producer(...)``).
"""

from __future__ import annotations

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
from confluent_kafka.admin import AdminClient

from celery_redis_retry.errors import KafkaCredentialsError, TopicMissingError
from celery_redis_retry.kafka.admin import (
    NewTopic,
    PartitionOffsets,
    TopicDescription,
    cluster_brokers,
    create_topics,
    describe_topics,
    group_offsets,
    new_admin,
)
from celery_redis_retry.kafka.clients import (
    AUTHENTICATION_CODES,
    AUTHORIZATION_CODES,
    UNKNOWN_TOPIC_CODES,
    Record,
    authorization_problem,
    cluster_metadata,
    credentials_problem,
    did_not_answer,
    new_consumer,
    new_producer,
    no_answer_message,
    produce_confirmed,
    produce_reported,
    read_to_end,
    require_topic,
    topic_missing,
    topic_partitions,
)
from celery_redis_retry.kafka.commit_metadata import MAX_METADATA, format_offsets, parse_offsets
from celery_redis_retry.kafka.dev_broker import EmbeddedBroker, serve_dev_broker
from celery_redis_retry.kafka.settings import (
    CLASSIC_PROTOCOL_ONLY,
    CONSUMER_DEFAULTS,
    FORCED_CONSUMER,
    PRODUCER_DEFAULTS,
    check_client_settings,
    consumer_config,
    producer_config,
    static_membership,
)

__all__ = [
    "AUTHENTICATION_CODES",
    "AUTHORIZATION_CODES",
    "CLASSIC_PROTOCOL_ONLY",
    "CONSUMER_DEFAULTS",
    "FORCED_CONSUMER",
    "MAX_METADATA",
    "OFFSET_BEGINNING",
    "OFFSET_END",
    "PRODUCER_DEFAULTS",
    "UNKNOWN_TOPIC_CODES",
    "AdminClient",
    "Consumer",
    "EmbeddedBroker",
    "KafkaCredentialsError",
    "KafkaError",
    "KafkaException",
    "Message",
    "NewTopic",
    "PartitionOffsets",
    "Producer",
    "Record",
    "TopicDescription",
    "TopicMissingError",
    "TopicPartition",
    "authorization_problem",
    "check_client_settings",
    "cluster_brokers",
    "cluster_metadata",
    "consumer_config",
    "create_topics",
    "credentials_problem",
    "describe_topics",
    "did_not_answer",
    "format_offsets",
    "group_offsets",
    "new_admin",
    "new_consumer",
    "new_producer",
    "no_answer_message",
    "parse_offsets",
    "produce_confirmed",
    "produce_reported",
    "producer_config",
    "read_to_end",
    "require_topic",
    "serve_dev_broker",
    "static_membership",
    "topic_missing",
    "topic_partitions",
]
