"""What every ``redis-retry`` command shares: the app of ``celery -A``, its settings, logging, ``--timeout``.

Also the one way each command reports Kafka not answering (exit 4) and a missing
topic (exit 5), so that every command says it in the same words.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from celery_redis_retry.names import EXIT_CONFIG, EXIT_FAILURE, EXIT_NO_TOPIC, EXIT_UNAVAILABLE

_F = TypeVar("_F", bound=Callable[..., Any])


#: Seconds a command waits for Kafka to answer each request, unless --timeout says otherwise.
KAFKA_TIMEOUT = 10.0


def setup_logging(level: str, logfile: str | None = None, log_format: str = "text") -> None:
    """Log at ``level`` to stderr, or to ``logfile`` (appended) when given; ``log_format``
    "json" writes one JSON object per line (see :mod:`celery_redis_retry.logs`)."""
    from celery_redis_retry.logs import use_format

    handler = logging.FileHandler(logfile) if logfile else logging.StreamHandler(sys.stderr)
    logging.basicConfig(
        level=level.upper(),
        format="[%(asctime)s: %(levelname)s/%(processName)s] %(name)s: %(message)s",
        handlers=[handler],
    )
    use_format(log_format)


def timeout_option(default: float = KAFKA_TIMEOUT, what: str = "each request") -> Callable[[_F], _F]:
    """``--timeout SECONDS``: how long Kafka has to answer before the command gives up with exit 4."""
    return click.option("--timeout", default=default, show_default=True, type=click.FloatRange(0.5),
                        metavar="SECONDS", help=f"Seconds Kafka has to answer {what}; then the command exits 4.")


def app_name(ctx: click.Context) -> str:
    """The ``celery -A`` argument, to show the exact command that creates a missing topic."""
    return str(ctx.find_root().params.get("app") or "<app>")


def kafka_silent(ctx: click.Context, settings: Any, timeout: float) -> None:
    """Say that Kafka did not answer, naming its bootstrap servers, and exit 4."""
    from celery_redis_retry.kafka import no_answer_message

    click.echo(f"error: {no_answer_message(settings.kafka, timeout)}", err=True)
    ctx.exit(EXIT_UNAVAILABLE)


def missing_topic(ctx: click.Context, exc: Any) -> None:
    """Report a :class:`~celery_redis_retry.kafka.TopicMissingError` and exit 5."""
    click.echo(f"error: {exc.explain(app_name(ctx))}", err=True)
    ctx.exit(EXIT_NO_TOPIC)


def celery_app(ctx: click.Context) -> Any:
    """The Celery app of ``celery -A``; a usage error (exit 2) when none was given.

    Without ``-A`` Celery hands over its default app, which has no ``redis_retry_*``
    settings: better to ask for the app than to report the first missing setting.
    """
    app = getattr(ctx.obj, "app", None)
    if app is None or not ctx.find_root().params.get("app"):
        raise click.UsageError(
            "no Celery app given: name it with -A/--app (or CELERY_APP), e.g. celery -A proj redis-retry ..."
        )
    return app


def settings_of(ctx: click.Context) -> Any:
    from celery_redis_retry.config import settings_for
    from celery_redis_retry.errors import ConfigurationError

    try:
        return settings_for(celery_app(ctx.find_root()))
    except ConfigurationError as exc:
        click.echo(f"configuration error: {exc}", err=True)
        ctx.exit(EXIT_CONFIG)


def require_kafka_answer(ctx: click.Context, settings: Any, call: Any, timeout: float) -> Any:
    """``call()``'s result; exit 4, naming Kafka's address, when Kafka does not answer in time."""
    from celery_redis_retry.kafka import KafkaException, did_not_answer

    try:
        return call()
    except KafkaException as exc:
        if not did_not_answer(exc):
            raise
        kafka_silent(ctx, settings, timeout)


def quiet_kafka_logs() -> None:
    # A short-lived command reports an unreachable Kafka once, in its own words; it has
    # no use for librdkafka's line per reconnect attempt.
    setup_logging("WARNING")
    logging.getLogger("celery_redis_retry.librdkafka").setLevel(logging.CRITICAL)


def write_control(ctx: click.Context, timeout: float, call: Callable[[Any], Any]) -> Any:
    """``call(settings)``'s control record (a pause, a retry policy rule), or the command's exit naming what
    went wrong: 2 an unknown target or an invalid rule, 1 no such rule, 4 not confirmed, 5 no control topic."""
    from celery_redis_retry import kafka
    from celery_redis_retry.errors import PolicyRuleError, PublishError, UnknownPolicyError, UnknownTargetNameError

    quiet_kafka_logs()
    settings = settings_of(ctx)
    try:
        return require_kafka_answer(ctx, settings, lambda: call(settings), timeout)
    except (UnknownTargetNameError, PolicyRuleError) as exc:
        raise click.UsageError(str(exc)) from None
    except UnknownPolicyError as exc:
        click.echo(f"error: {exc}", err=True)
        ctx.exit(EXIT_FAILURE)
    except kafka.TopicMissingError as exc:
        missing_topic(ctx, exc)
    except PublishError as exc:
        click.echo(f"error: {exc}", err=True)
        ctx.exit(EXIT_UNAVAILABLE)
