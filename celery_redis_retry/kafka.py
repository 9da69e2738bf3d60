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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
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
from confluent_kafka import admin as _admin
from confluent_kafka.admin import AdminClient

from .errors import ConfigurationError
from .librdkafka_log import LIBRDKAFKA_LOG, STATISTICS_INTERVAL_MS

#: A topic to create (confluent_kafka exports it at runtime, but its type stubs do not).
NewTopic: Any = _admin.NewTopic  # type: ignore[attr-defined]

__all__ = [
    "AUTHENTICATION_CODES",
    "AUTHORIZATION_CODES",
    "OFFSET_BEGINNING",
    "OFFSET_END",
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
    "TopicDescription",
    "TopicMissingError",
    "TopicPartition",
    "authorization_problem",
    "cluster_brokers",
    "cluster_metadata",
    "consumer_config",
    "create_topics",
    "credentials_problem",
    "describe_topics",
    "group_offsets",
    "new_admin",
    "new_consumer",
    "new_producer",
    "produce_confirmed",
    "producer_config",
    "read_to_end",
    "require_topic",
    "serve_dev_broker",
    "topic_missing",
    "topic_partitions",
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

#: Consumer keys of the classic group protocol that ``group.protocol=consumer`` (KIP-848)
#: moves to the broker (``group.consumer.*`` settings, ``group.remote.assignor``).
CLASSIC_PROTOCOL_ONLY = frozenset(
    ("partition.assignment.strategy", "session.timeout.ms", "heartbeat.interval.ms", "group.protocol.type")
)

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
     "allow.auto.create.topics", "queued.max.messages.kbytes", "fetch.max.bytes", "max.partition.fetch.bytes",
     "group.protocol", "group.remote.assignor")
)


def producer_config(user: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """librdkafka producer settings: defaults, then ``redis_retry_kafka``, then ``overrides``."""
    conf = {**PRODUCER_DEFAULTS, **{k: v for k, v in user.items() if k not in _CONSUMER_ONLY}, **overrides}
    return _with_quiet_log(conf)


def consumer_config(user: Mapping[str, Any], group_id: str, **overrides: Any) -> dict[str, Any]:
    """librdkafka consumer settings for ``group_id`` (see :data:`FORCED_CONSUMER`)."""
    mine = {k: v for k, v in user.items() if k not in _PRODUCER_ONLY}
    defaults = dict(CONSUMER_DEFAULTS)
    if str(mine.get("group.protocol", "classic")).lower() == "consumer":
        # KIP-848: the broker runs the rebalance and owns these; librdkafka refuses them.
        # Ours go quietly; a user's own are left for librdkafka to refuse, naming the key.
        for key in CLASSIC_PROTOCOL_ONLY:
            defaults.pop(key, None)
    conf = {**defaults, **mine, "group.id": group_id, **overrides}
    return _with_quiet_log(conf)


def _with_quiet_log(conf: dict[str, Any]) -> dict[str, Any]:
    """``conf`` logging to :data:`LIBRDKAFKA_LOG` (one line per broker outage, not per reconnect attempt).

    Its statistics tell it when a broker is back; a ``stats_cb`` of the user's still gets them.
    A ``logger`` of the user's replaces it, and ``statistics.interval.ms`` 0 leaves the
    outage's end untold.
    """
    conf.setdefault("logger", LIBRDKAFKA_LOG)
    conf.setdefault("statistics.interval.ms", STATISTICS_INTERVAL_MS)
    users = conf.get("stats_cb")

    def statistics(document: str) -> None:
        LIBRDKAFKA_LOG.statistics(document)
        if users is not None:
            users(document)

    conf["stats_cb"] = statistics
    return conf


# Never polled: the check's own warnings (consumer keys in a producer...) go nowhere.
_UNHEARD = logging.getLogger("celery_redis_retry.librdkafka.settings_check")
_UNHEARD.propagate = False
_UNHEARD.addHandler(logging.NullHandler())


def check_client_settings(user: Mapping[str, Any]) -> None:
    """Refuse ``redis_retry_kafka`` properties librdkafka refuses, without connecting anywhere.

    librdkafka checks each property's name and value as it is set, and the producer's
    combination (``acks`` with idempotence...) when the client is created. So a producer
    is built from the producer's configuration plus the consumer-only keys, without
    ``bootstrap.servers`` (it has no broker to connect to), and destroyed at once: a few
    milliseconds, and its two threads end with it. Callbacks are left out (they are the
    application's code, not librdkafka settings).

    :raises ConfigurationError: naming the key given (when one key alone is refused) and
        librdkafka's message, which names the property by librdkafka's own name.
    """
    conf = {**producer_config(user), **{k: v for k, v in user.items() if k in _CONSUMER_ONLY}}
    for key in [k for k, v in conf.items() if callable(v)]:
        del conf[key]
    conf.pop("bootstrap.servers", None)
    conf["logger"] = _UNHEARD
    problem = _refused(conf, create=True)
    if problem is not None:
        # librdkafka names a property by its own name (acks -> request.required.acks): name the key given too.
        culprit = next((k for k, v in user.items() if _refused({k: v, "logger": _UNHEARD}, create=False)), None)
        raise ConfigurationError(f"redis_retry_kafka{'' if culprit is None else f'[{culprit!r}]'}: {problem}")


#: No such librdkafka property: setting it last stops the check before any client is created.
_STOP = "celery_redis_retry.check"


def _refused(conf: dict[str, Any], *, create: bool) -> str | None:
    """librdkafka's message refusing ``conf``, or None. ``create``: also build (and close) the
    client, which checks combinations; otherwise only the properties are set, one by one."""
    try:
        if create:
            Producer(conf).close()  # nothing to flush: it never had a broker
        else:
            Producer({**conf, _STOP: 0})
    except KafkaException as exc:
        error = exc.args[0]
        message = error.str() if isinstance(error, KafkaError) else str(exc)
        return None if _STOP in message else message
    except (TypeError, ValueError) as exc:  # a value confluent-kafka cannot pass on (a list, None...)
        return str(exc)
    return None


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


class KafkaCredentialsError(ConfigurationError):
    """The cluster refused this process's SASL credentials: a setting to fix, not an outage."""

    def __init__(self, user: Mapping[str, Any], detail: str) -> None:
        super().__init__(credentials_problem(user, detail))


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
                raise KafkaCredentialsError(refused.user, refused.error.str()) from None
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


def new_admin(user: Mapping[str, Any]) -> AdminClient:
    """An AdminClient with the connection settings of ``redis_retry_kafka`` (client-type keys dropped)."""
    conf = {k: v for k, v in user.items() if k not in _PRODUCER_ONLY and k not in _CONSUMER_ONLY}
    conf.setdefault("logger", LIBRDKAFKA_LOG)
    return AdminClient(conf)


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

#: The command that creates the topics, as the errors below suggest it.
CREATE_COMMAND = "celery -A {app} redis-retry topics create"


class TopicMissingError(KafkaException):
    """A topic this process needs does not exist on the cluster (it does not create topics on use).

    :attr:`topic` names it, :attr:`bootstrap` the cluster; ``str()`` says how to create it.
    """

    def __init__(self, topic: str, bootstrap: str, *, role: str = "") -> None:
        self.topic = topic
        self.bootstrap = bootstrap
        self.role = role
        super().__init__(self.explain())

    def explain(self, app: str = "<app>") -> str:
        """The message, with ``app`` (the ``celery -A`` argument) in the command to run."""
        what = f"{self.role} topic" if self.role else "topic"
        return (
            f"{what} {self.topic!r} does not exist on {self.bootstrap}; "
            f"create it with: {CREATE_COMMAND.format(app=app)}"
        )


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


#: A message to produce: key, value and headers.
Record = tuple[bytes | None, bytes, list[tuple[str, str | bytes | None]] | None]


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


#: Kafka brokers keep commit metadata up to ``offset.metadata.max.bytes`` (4096 by default).
MAX_METADATA = 4000


def format_offsets(offsets: Iterable[int], *, truncate: bool = False) -> str:
    """Offsets as ranges, ``{12, 15, 16, 17}`` -> ``"12,15-17"``, for a commit's metadata.

    Past :data:`MAX_METADATA` characters (the broker would refuse it) :class:`ValueError`,
    or with ``truncate`` the highest ranges are left out.
    """
    ranges: list[list[int]] = []
    for offset in sorted(offsets):
        if ranges and offset == ranges[-1][1] + 1:
            ranges[-1][1] = offset
        else:
            ranges.append([offset, offset])
    parts = [str(a) if a == b else f"{a}-{b}" for a, b in ranges]
    text = ",".join(parts)
    if len(text) > MAX_METADATA:
        if not truncate:
            raise ValueError(
                f"{len(ranges)} separate runs of handled records past the oldest pending one: too many to remember; "
                "replay or purge the oldest pending records first"
            )
        kept, size = [], 0
        for part in parts:
            size += len(part) + 1
            if size > MAX_METADATA:
                break
            kept.append(part)
        text = ",".join(kept)
    return text


def parse_offsets(text: str | None) -> frozenset[int]:
    """The offsets of :func:`format_offsets`' text (empty for None, ``""`` or text it did not write)."""
    offsets: set[int] = set()
    try:
        for part in (text or "").split(","):
            if part:
                first, _, last = part.partition("-")
                offsets.update(range(int(first), int(last or first) + 1))
    except ValueError:
        return frozenset()
    return frozenset(offsets)


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


def serve_dev_broker(bootstrap_file: str | None = None, port: int | None = None) -> None:
    """Run an :class:`EmbeddedBroker` until SIGINT or SIGTERM; print its address first.

    With ``port``, clients bootstrap through ``127.0.0.1:port`` (see :mod:`.dev_port`).
    :raises OSError: if ``port`` cannot be bound.
    """
    from .dev_port import PortForwarder

    stop = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    broker = EmbeddedBroker()
    forwarder = PortForwarder(port, broker.bootstrap_servers) if port is not None else None
    bootstrap = forwarder.address if forwarder is not None else broker.bootstrap_servers
    print(f"bootstrap.servers={bootstrap}", flush=True)
    if bootstrap_file:
        folder = os.path.dirname(os.path.abspath(bootstrap_file))
        with tempfile.NamedTemporaryFile("w", dir=folder, delete=False) as out:
            out.write(bootstrap + "\n")
        os.replace(out.name, bootstrap_file)  # readers never see a half-written file
    try:
        received = signal.sigwait(stop)
        logger.info("dev-kafka: %s received, stopping", signal.Signals(received).name)
    finally:
        if forwarder is not None:
            forwarder.close()
        broker.close()
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
