"""The librdkafka settings this project relies on, chosen in one place and explained once.

User settings from ``redis_retry_kafka`` go on top of the defaults here (idempotent
producer, manual offset storage for the bridge...), except the few that correctness
depends on, which are forced (:data:`FORCED_CONSUMER`). :func:`check_client_settings`
finds a bad key at startup by letting librdkafka itself read the settings.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Mapping
from typing import Any

from confluent_kafka import (
    KafkaError,
    KafkaException,
    Producer,
)

from celery_redis_retry.errors import ConfigurationError
from celery_redis_retry.kafka.log import LIBRDKAFKA_LOG, STATISTICS_INTERVAL_MS

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
    # batches; 1 MiB ahead (2,500 ops of 400 bytes) keeps it busy. Measured in a 100,000-op
    # drain (bench_drain, Tansu): the bridge's peak RSS 92 MiB instead of 113 with 4 MiB
    # (and 2 MiB / 512 KiB fetches), at the same rate.
    "queued.max.messages.kbytes": 1024,
    "fetch.max.bytes": 1024 * 1024,
    "max.partition.fetch.bytes": 256 * 1024,
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


#: What a bridge's ``--name`` may hold: it becomes part of the consumers' ``group.instance.id``.
_BRIDGE_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")


def static_membership(user: Mapping[str, Any], name: str | None, host: str | None = None) -> dict[str, str]:
    """``group.instance.id`` for a bridge named ``name``: ``<host>.<name>``, or nothing.

    A static member that restarts gets its partitions back at once, where a new member
    waits for the group to notice the old one is gone (``session.timeout.ms``, 45 s, after
    a crash; measured in benchmarks/bench_join.py). Only with a name the operator keeps
    stable across restarts and unique among the group's bridges on one host: two bridges
    with one instance id fence each other. Nothing when ``redis_retry_kafka`` sets its own
    ``group.instance.id`` (it wins), and nothing with ``group.protocol=consumer``
    (KIP-848): there, measured with librdkafka 2.16 and Kafka 4.1, a static member
    restarted after a graceful stop is refused ("the instance ID is still used by another
    member") until its session times out.

    :raises ConfigurationError: for a name that is empty, too long or holds other than
        letters, digits, ``.``, ``_`` and ``-``.
    """
    if name is None:
        return {}
    if not _BRIDGE_NAME.fullmatch(name):
        raise ConfigurationError(
            f"bridge name {name!r}: use 1-100 letters, digits, '.', '_' or '-' (it becomes group.instance.id)"
        )
    if "group.instance.id" in user or str(user.get("group.protocol", "classic")).lower() == "consumer":
        return {}
    return {"group.instance.id": f"{host or socket.gethostname()}.{name}"}


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


def admin_config(user: Mapping[str, Any]) -> dict[str, Any]:
    """An AdminClient's settings: those of ``redis_retry_kafka`` without the client-type keys."""
    conf = {k: v for k, v in user.items() if k not in _PRODUCER_ONLY and k not in _CONSUMER_ONLY}
    conf.setdefault("logger", LIBRDKAFKA_LOG)
    return conf
