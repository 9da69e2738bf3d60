"""Kafka clients as every role builds them, and what their errors mean.

Producers, consumers and admin clients get their settings from
:mod:`celery_redis_retry.kafka.settings` and their log from
:mod:`celery_redis_retry.kafka.log`; a refused login, a cluster that does not answer
and a missing topic are told apart here, so that each names what to do about it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from celery_redis_retry.errors import KafkaCredentialsError, TopicMissingError
from celery_redis_retry.kafka.settings import consumer_config, producer_config

logger = logging.getLogger(__name__)





















# -- refused credentials and missing ACLs ----------------------------------------------------

#: How librdkafka reports credentials the cluster refused (a wrong SASL user or password).
AUTHENTICATION_CODES = frozenset((KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED))

#: How a broker refuses an operation to an authenticated principal that has no ACL for it.
AUTHORIZATION_CODES = frozenset(
    (KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.GROUP_AUTHORIZATION_FAILED,
     KafkaError.CLUSTER_AUTHORIZATION_FAILED)
)


def credentials_problem(user: Mapping[str, Any], detail: str) -> str:
    """What to tell an operator whose SASL login the cluster refused: the settings to check."""
    mechanism = user.get("sasl.mechanism") or user.get("sasl.mechanisms") or "GSSAPI"
    return (
        f"Kafka at {user.get('bootstrap.servers')} refused the credentials of sasl.username "
        f"{user.get('sasl.username')!r} ({mechanism}): check redis_retry_kafka['sasl.username'] and "
        f"redis_retry_kafka['sasl.password'] ({detail})"
    )


def authorization_problem(user: Mapping[str, Any], topic: str, operation: str, detail: str) -> str:
    """What to tell an operator whose principal may not ``operation`` ``topic``: the ACL to grant."""
    name = user.get("sasl.username")
    principal = f"User:{name}" if name else "this client's principal"
    return (
        f"Kafka refused {operation} on topic {topic!r} to {principal} ({detail}): grant it "
        f"with an ACL (see docs/security.md)"
    )


class _RefusedLogin:
    """The ``error_cb`` of the clients built here: remembers a refused login, so that a
    metadata request that would time out names the setting to fix instead."""

    def __init__(self, user: Mapping[str, Any], chained: Any = None) -> None:
        self.user = user
        self.chained = chained
        self.error: KafkaError | None = None

    def __call__(self, error: KafkaError) -> None:
        if error.code() in AUTHENTICATION_CODES:
            self.error = error
        if self.chained is not None:
            self.chained(error)


class _WatchedProducer(Producer):
    refused_login: _RefusedLogin


class _WatchedConsumer(Consumer):
    refused_login: _RefusedLogin


def new_producer(user: Mapping[str, Any], **overrides: Any) -> Producer:
    """A confluent-kafka Producer built with :func:`producer_config`."""
    conf = producer_config(user, **overrides)
    refused = conf["error_cb"] = _RefusedLogin(conf, conf.get("error_cb"))
    producer = _WatchedProducer(conf)
    producer.refused_login = refused
    return producer


def new_consumer(user: Mapping[str, Any], group_id: str, **overrides: Any) -> Consumer:
    """A confluent-kafka Consumer built with :func:`consumer_config`."""
    conf = consumer_config(user, group_id, **overrides)
    refused = conf["error_cb"] = _RefusedLogin(conf, conf.get("error_cb"))
    consumer = _WatchedConsumer(conf)
    consumer.refused_login = refused
    return consumer


def cluster_metadata(client: Consumer | Producer, topic: str | None = None, *, timeout: float = 10.0) -> Any:
    """``client.list_topics(topic)``, but a refused login fails at once, naming the setting.

    :raises KafkaCredentialsError: as soon as the cluster refused the SASL credentials.
    :raises KafkaException: if Kafka does not answer within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.list_topics(topic, timeout=max(0.1, min(1.0, deadline - time.monotonic())))
        except KafkaException:
            refused = _refused_login(client)
            if refused is not None and refused.error is not None:
                raise KafkaCredentialsError(credentials_problem(refused.user, refused.error.str())) from None
            if time.monotonic() >= deadline:
                raise


#: librdkafka's codes for a cluster that did not answer: down, unreachable, or too slow.
_NO_ANSWER = (KafkaError._TRANSPORT, KafkaError._TIMED_OUT, KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE)


def did_not_answer(exc: KafkaException) -> bool:
    """Whether ``exc`` says that Kafka did not answer in time, rather than that it refused a request."""
    error = exc.args[0] if exc.args else None
    return isinstance(error, KafkaError) and error.code() in _NO_ANSWER


def no_answer_message(user: Mapping[str, Any], timeout: float) -> str:
    """``Kafka at HOST:PORT did not answer within N s``, for the commands' errors."""
    return f"Kafka at {user.get('bootstrap.servers')} did not answer within {timeout:g} s"


def _refused_login(client: Consumer | Producer) -> _RefusedLogin | None:
    memory: _RefusedLogin | None = getattr(client, "refused_login", None)  # clients built here have one
    if memory is not None and (not isinstance(client, Consumer) or not client.assignment()):
        # Errors reach error_cb only through poll(); a consumer not yet assigned has no
        # message to lose by it (and a producer's poll serves delivery reports, as it should).
        client.poll(0)
    return memory




def read_to_end(
    user: Mapping[str, Any], topic: str, start: Mapping[int, int] | None = None, *, timeout: float = 30.0,
    must_exist: bool = False,
) -> list[Message]:
    """The messages of ``topic`` from ``start`` (partition -> offset) to the end of each partition.

    Partitions missing from ``start`` are read from the beginning. Reads directly, without
    joining or committing a consumer group, and stops when every partition reported its
    end (not on a timer), so the result is complete as of the call. Used by the operator
    commands. :class:`KafkaException` if the end is not reached within ``timeout``; with
    ``must_exist``, :class:`TopicMissingError` if the topic does not exist (otherwise a
    missing topic reads as empty).
    """
    consumer = new_consumer(
        user, f"celery-redis-retry-reader-{os.getpid()}-{time.monotonic_ns()}",
        **{"enable.auto.commit": False, "enable.partition.eof": True},
    )
    try:
        partitions = topic_partitions(consumer, topic, timeout)
        if not partitions and must_exist:
            require_topic(consumer, topic, user, timeout=timeout)
        begin = start or {}
        consumer.assign([TopicPartition(topic, p, begin.get(p, OFFSET_BEGINNING)) for p in partitions])
        deadline = time.monotonic() + timeout
        waiting = set(partitions)
        messages: list[Message] = []
        while waiting:
            if time.monotonic() >= deadline:
                raise KafkaException(f"{topic}: partitions {sorted(waiting)} not read to the end in {timeout} s")
            for message in consumer.consume(1000, timeout=0.2):
                error = message.error()
                if error is None:
                    messages.append(message)
                elif error.code() == KafkaError._PARTITION_EOF:
                    waiting.discard(message.partition())
                else:
                    raise KafkaException(error)
        return messages
    finally:
        consumer.close()


def topic_partitions(client: Consumer, topic: str, timeout: float = 10.0) -> list[int]:
    """The partition ids of ``topic`` (empty if it does not exist yet)."""
    described = cluster_metadata(client, topic, timeout=timeout).topics.get(topic)
    if described is None or described.error is not None:
        return []
    return sorted(described.partitions)


#: How a broker says a topic does not exist: in metadata and produce responses
#: (UNKNOWN_TOPIC_OR_PART), or librdkafka locally, for a topic it never saw (_UNKNOWN_TOPIC).
UNKNOWN_TOPIC_CODES = frozenset((KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC))

#: How long :func:`topic_missing` keeps asking before it believes "unknown topic": a broker
#: that creates topics on first use answers so while it creates one, for a moment.
MISSING_TOPIC_WINDOW = 2.0

def topic_missing(
    client: Consumer | Producer, topic: str, *, timeout: float = 10.0, window: float = MISSING_TOPIC_WINDOW
) -> bool:
    """Whether the cluster says ``topic`` does not exist, asked again for ``window`` seconds.

    One metadata request when the topic exists. Clients built here may ask the broker to
    create a topic they look up (producers always, consumers with
    ``allow.auto.create.topics``): on a broker that does so, such as the development
    broker, the answer is False, as it is while a topic is being created
    (LEADER_NOT_AVAILABLE). :class:`KafkaException` if Kafka does not answer.
    """
    deadline = time.monotonic() + window
    while True:
        described = cluster_metadata(client, topic, timeout=timeout).topics.get(topic)
        error = None if described is None else described.error
        if described is not None and (error is None or error.code() not in UNKNOWN_TOPIC_CODES):
            return False
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.25)


def require_topic(
    client: Consumer | Producer, topic: str, user: Mapping[str, Any], *, role: str = "", timeout: float = 10.0,
    window: float = MISSING_TOPIC_WINDOW,
) -> None:
    """:class:`TopicMissingError` naming ``topic`` if :func:`topic_missing` says so."""
    if topic_missing(client, topic, timeout=timeout, window=window):
        raise TopicMissingError(topic, str(user.get("bootstrap.servers")), role=role)


# -- topic administration (``redis-retry topics``) -----------------------------------------










#: A message to produce: key, value and headers.
Record = tuple[bytes | None, bytes, list[tuple[str, str | bytes | None]] | None]






def produce_confirmed(producer: Producer, topic: str, records: list[Record]) -> list[str | None]:
    """Produce ``records`` (key, value, headers) and wait for every delivery report.

    Returns one entry per record: None once the broker confirmed it, else the error.
    Bounded: librdkafka reports every message within ``message.timeout.ms``.
    """
    done: list[list[str | None]] = []
    produce_reported(producer, topic, records, done.append)
    while not done:
        producer.poll(0.5)
    return done[0]


def produce_reported(
    producer: Producer, topic: str, records: list[Record], on_reports: Callable[[list[str | None]], None]
) -> None:
    """Produce ``records`` without waiting; once every one is reported, call ``on_reports``.

    ``on_reports`` gets one entry per record (None: confirmed, else the error) from inside
    ``producer.poll()`` or ``flush()``, in the thread that calls them.
    """
    reports: list[str | None] = [None] * len(records)
    pending = len(records)

    def settle() -> None:
        nonlocal pending
        pending -= 1
        if pending == 0:
            on_reports(reports)

    def reported(index: int) -> Any:
        def on_delivery(err: KafkaError | None, _message: Message) -> None:
            reports[index] = None if err is None else err.str()
            settle()
        return on_delivery

    if not records:
        on_reports(reports)
    for index, (key, value, headers) in enumerate(records):
        while True:
            try:
                producer.produce(topic, value, key, headers=headers, on_delivery=reported(index))
                break
            except BufferError:
                producer.poll(0.1)  # librdkafka's queue is full: let deliveries make room
            except KafkaException as exc:
                reports[index] = str(exc)
                settle()
                break










