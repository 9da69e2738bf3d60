"""What the settings require of the Celery broker, and what the bridge asks of it.

A backoff cap longer than a Redis or SQS broker's visibility timeout would have the
broker deliver a countdown task twice: refused at startup. A broker that is also a
replay target is worth a warning (an outage of one is an outage of both). Publisher
confirms on RabbitMQ, so that a task the broker did not take is not counted as handed
over.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from celery_redis_retry.config.settings import Settings
from celery_redis_retry.errors import ConfigurationError
from celery_redis_retry.targets import normal_host, redacted

# Celery brokers that redeliver an unacknowledged message after a visibility timeout.
_VISIBILITY_TIMEOUT_BROKERS = frozenset(("redis", "rediss", "sentinel", "sqs", "redis+socket"))


_DEFAULT_VISIBILITY_TIMEOUT = 3600  # kombu's default for Redis and SQS

logger = logging.getLogger(__name__)


# Celery brokers (RabbitMQ) whose publishes are confirmed only when asked to.
_CONFIRMING_BROKERS = frozenset(("amqp", "amqps", "pyamqp"))


def celery_broker_url(conf: Mapping[str, Any]) -> str:
    """The Celery broker URL as the worker reads it (``CELERY_BROKER_URL`` overrides ``broker_url``);
    failover URLs are separated by ``;``."""
    # Celery's own property on an app's conf; a plain mapping has only the key.
    return str(getattr(conf, "broker_url", None) or conf.get("broker_url") or "")


def shown_broker_url(conf: Mapping[str, Any]) -> str:
    """The Celery broker URL(s) for a message: each password shown as ``***``."""
    return ";".join(redacted(url) for url in celery_broker_url(conf).split(";"))


def _broker_scheme(conf: Mapping[str, Any]) -> str:
    return urlsplit(celery_broker_url(conf).split(";")[0]).scheme


def confirm_task_publishing(app: Any) -> None:
    """On a RabbitMQ Celery broker, turn publisher confirms on for the app's task messages
    (``broker_transport_options['confirm_publish']``) unless the app says otherwise.

    Without them ``basic_publish`` returns before the broker has the message; with them,
    "Celery accepted the task" (when the bridge counts an op handed over) is really true.
    """
    if _broker_scheme(app.conf) in _CONFIRMING_BROKERS:
        options = dict(app.conf.broker_transport_options or {})
        options.setdefault("confirm_publish", True)
        app.conf.broker_transport_options = options


def check_broker_visibility(settings: Settings, conf: Mapping[str, Any]) -> None:
    """Refuse a backoff cap the Celery broker's visibility timeout would turn into duplicates.

    On Redis and SQS brokers a message not acknowledged within ``visibility_timeout``
    is delivered again. A retry scheduled ``redis_retry_backoff_max`` seconds ahead is
    held unacknowledged by the worker until then, so a cap at or above the timeout
    makes every long retry run twice.
    """
    check_backoff_cap(settings.backoff.maximum, conf, what="redis_retry_backoff_max")


def check_backoff_cap(maximum: float, conf: Mapping[str, Any], *, what: str) -> None:
    """:class:`ConfigurationError` naming ``what`` when a backoff cap of ``maximum`` s reaches the
    Celery broker's visibility timeout (see :func:`check_broker_visibility`); retry policy rules share it."""
    if _broker_scheme(conf) not in _VISIBILITY_TIMEOUT_BROKERS:
        return
    options = conf.get("broker_transport_options") or {}
    timeout = options.get("visibility_timeout", _DEFAULT_VISIBILITY_TIMEOUT)
    if maximum >= timeout:
        raise ConfigurationError(
            f"{what} ({maximum:g} s) must be below the Celery broker's "
            f"broker_transport_options['visibility_timeout'] ({timeout} s): a retry held longer than that "
            "is redelivered and would run twice"
        )


def _server(url: str) -> tuple[str, int] | None:
    """``(host, port)`` of a redis:// or rediss:// URL (a cluster's seed node too); None for others."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "redis+cluster", "rediss+cluster"):
        return None
    try:
        port = parts.port or 6379
    except ValueError:  # several cluster nodes: the first is the seed node
        return _server(parts._replace(netloc=parts.netloc.split(",")[0]).geturl())
    return normal_host(parts.hostname or "localhost"), port


def broker_shared_with_targets(settings: Settings, conf: Mapping[str, Any]) -> list[str]:
    """The targets whose Redis server is also the Celery broker (by host and port)."""
    brokers = {_server(url) for url in celery_broker_url(conf).split(";")} - {None}
    return [name for name, url in settings.targets.items() if _server(url) in brokers]


def warn_if_broker_is_a_target(settings: Settings, conf: Mapping[str, Any]) -> None:
    """Log a warning when the Celery broker is the Redis server of a target: an outage stops both."""
    for name in broker_shared_with_targets(settings, conf):
        logger.warning(
            "the Celery broker is the Redis server of target %r (%s): while it is down, no op of any target "
            "can be handed to Celery, so the bridge stalls its partitions and every op waits in Kafka until it "
            "is back; give the Celery broker a server of its own", name, settings.targets[name],
        )
