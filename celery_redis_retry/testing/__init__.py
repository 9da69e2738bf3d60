"""Real processes for tests: redis-server, Kafka-protocol brokers, Celery workers and commands.

Nothing here is a mock. Every class starts a real subprocess in its own process group,
sends its output to a log file (``.log_path``) and cleans up the whole group when
stopped, so a failing test leaves no orphan behind and shows the log tail of whatever
did not start. Use it in your own tests::

    from celery_redis_retry.testing import CeleryWorker, EmbeddedKafka, RedisServer, read_topic

    with RedisServer().start() as redis_server, EmbeddedKafka().start() as kafka:
        app.conf.redis_retry_kafka = {"bootstrap.servers": kafka.bootstrap_servers}
        app.conf.redis_retry_targets = {"default": redis_server.url}
        ...
        records = read_topic(kafka.bootstrap_servers, "redis-retry-queue.dlq", count=1)

Two Kafka brokers are offered: :class:`EmbeddedKafka` (librdkafka's mock cluster, the
``dev-kafka`` command) and :class:`TansuKafka` (an independent Kafka-protocol server),
so the code is checked against two implementations of the protocol, not one.
"""


from celery_redis_retry.errors import HarnessError, HarnessTimeoutError, ProcessExitedError
from celery_redis_retry.testing.apache_kafka import (
    KAFKA_VERSION,
    ApacheKafka,
    KafkaNode,
    KafkaUser,
    SelfSignedCertificates,
    java_binary,
    kafka_libs,
)
from celery_redis_retry.testing.celery_processes import CeleryCommand, CeleryWorker
from celery_redis_retry.testing.kafka_brokers import (
    TEST_CONSUMER_SETTINGS,
    EmbeddedKafka,
    KafkaBroker,
    TansuKafka,
    TopicRecord,
    read_topic,
    tansu_binary,
)
from celery_redis_retry.testing.processes import ManagedProcess, free_port, free_ports, quiet_port, wait_until
from celery_redis_retry.testing.rabbitmq import RabbitMQServer, rabbitmq_server_binary
from celery_redis_retry.testing.redis_cluster import RedisCluster
from celery_redis_retry.testing.redis_servers import (
    RedisSentinel,
    RedisServer,
    redis_server_binary,
    valkey_server_binary,
)

__all__ = [
    "KAFKA_VERSION",
    "TEST_CONSUMER_SETTINGS",
    "ApacheKafka",
    "CeleryCommand",
    "CeleryWorker",
    "EmbeddedKafka",
    "HarnessError",
    "HarnessTimeoutError",
    "KafkaBroker",
    "KafkaNode",
    "KafkaUser",
    "ManagedProcess",
    "ProcessExitedError",
    "RabbitMQServer",
    "RedisCluster",
    "RedisSentinel",
    "RedisServer",
    "SelfSignedCertificates",
    "TansuKafka",
    "TopicRecord",
    "free_port",
    "free_ports",
    "java_binary",
    "kafka_libs",
    "quiet_port",
    "rabbitmq_server_binary",
    "read_topic",
    "redis_server_binary",
    "tansu_binary",
    "valkey_server_binary",
    "wait_until",
]
