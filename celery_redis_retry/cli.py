"""Command line: ``celery -A proj redis-retry ...`` and the standalone ``celery-redis-retry``.

``redis-retry`` plugs into the ``celery`` command through the ``celery.commands`` entry
point, the way Flower does: the app comes from ``celery -A``, and Celery's own options
(``--broker``, ``--loglevel``...) keep working. Heavy imports live inside the command
bodies so that ``celery --help`` stays fast. Only this module configures logging.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

#: Exit codes shared by every command.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3  # a redis_retry_* setting is missing or invalid
EXIT_UNAVAILABLE = 4  # Kafka or the Celery broker cannot be reached at start


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="[%(asctime)s: %(levelname)s/%(processName)s] %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _app(ctx: click.Context) -> Any:
    app = getattr(ctx.obj, "app", None)
    if app is None:
        raise click.UsageError("run this through celery: celery -A proj redis-retry ...")
    return app


@click.group("redis-retry")
@click.pass_context
def redis_retry(ctx: click.Context) -> None:
    """Replay failed Redis writes from Kafka with Celery (celery_redis_retry)."""


@redis_retry.command("bridge")
@click.option("--batch-size", default=None, type=click.IntRange(1, 10_000),
              help="Most ops per replay task; 1 sends one task per op (default: redis_retry_batch_size).")
@click.option("--linger-ms", default=None, type=click.IntRange(0, 60_000),
              help="Longest wait for a batch to fill (default: redis_retry_batch_linger_ms).")
@click.option("--poll-timeout", default=1.0, show_default=True, type=click.FloatRange(0.01, 60),
              help="Seconds one poll waits for messages.")
@click.option("--group", default=None, help="Consumer group (default: redis_retry_consumer_group).")
@click.option("--loglevel", "-l", default="INFO", show_default=True, help="Logging level.")
@click.pass_context
def bridge(  # noqa: PLR0917 - click passes every option
    ctx: click.Context, batch_size: int | None, linger_ms: int | None, poll_timeout: float, group: str | None,
    loglevel: str,
) -> None:
    """Feed ops from Kafka to Celery replay tasks until SIGTERM/SIGINT.

    Run several to scale out: they share the consumer group. Exits 0 after a graceful
    stop, 3 on bad settings, 4 when Kafka or the Celery broker is unreachable at start.
    """
    from .bridge import Bridge, BridgeUnavailableError
    from .errors import ConfigurationError

    _setup_logging(loglevel)
    app = _app(ctx)
    try:
        runner = Bridge(app, group=group, batch_size=batch_size, linger_ms=linger_ms, poll_timeout=poll_timeout)
        runner.install_signal_handlers()
        runner.run()
    except ConfigurationError as exc:
        click.echo(f"configuration error: {exc}", err=True)
        ctx.exit(EXIT_CONFIG)
    except BridgeUnavailableError as exc:
        click.echo(f"cannot start the bridge: {exc}", err=True)
        ctx.exit(EXIT_UNAVAILABLE)


@redis_retry.group("spool")
def spool() -> None:
    """Inspect and drain this host's local spool (ops Kafka could not take)."""


def _spool_producer(ctx: click.Context) -> Any:
    from .config import settings_for
    from .errors import ConfigurationError
    from .producer import RetryProducer

    try:
        return RetryProducer(settings_for(_app(ctx)), handle_sigterm=False)
    except ConfigurationError as exc:
        click.echo(f"configuration error: {exc}", err=True)
        ctx.exit(EXIT_CONFIG)


@spool.command("status")
@click.pass_context
def spool_status(ctx: click.Context) -> None:
    """Messages waiting in the spool, their size and age, and who drains them."""
    import time

    status = _spool_producer(ctx.find_root()).spool.status()
    age = f"{time.time() - status.oldest_at:.0f} s" if status.oldest_at is not None else "-"
    click.echo(f"spool:     {status.path}")
    click.echo(f"messages:  {status.messages}")
    click.echo(f"size:      {status.bytes} of {status.max_bytes} bytes ({100 * status.bytes / status.max_bytes:.1f}%)")
    click.echo(f"oldest:    {age}")
    click.echo(f"draining:  {status.lease_owner or '-'}")


@spool.command("drain")
@click.option("--timeout", default=60.0, show_default=True, type=click.FloatRange(1), help="Give up after seconds.")
@click.pass_context
def spool_drain(ctx: click.Context, timeout: float) -> None:
    """Republish the spool to Kafka now. Exits 0 once it is empty, 1 if messages remain."""
    _setup_logging("INFO")
    producer = _spool_producer(ctx.find_root())
    before = producer.spool.count()
    left = producer.drain(timeout)
    producer.close()
    click.echo(f"drained {before - left} messages, {left} left in {producer.spool.path}")
    ctx.exit(EXIT_OK if left == 0 else EXIT_FAILURE)


# -- the standalone command ----------------------------------------------------------------


@click.group("celery-redis-retry")
@click.version_option(package_name="celery-redis-retry")
def main() -> None:
    """Development tools of celery_redis_retry (the runtime commands live under ``celery redis-retry``)."""


@main.command("dev-kafka")
@click.option(
    "--bootstrap-file",
    type=click.Path(dir_okay=False, writable=True),
    help="Also write HOST:PORT to this file once the broker listens.",
)
@click.option("--loglevel", "-l", default="WARNING", show_default=True, help="Logging level.")
def dev_kafka(bootstrap_file: str | None, loglevel: str) -> None:
    """Run an embedded Kafka broker (librdkafka's mock cluster) until SIGINT/SIGTERM.

    Prints ``bootstrap.servers=HOST:PORT`` first. In-memory, about 5 MiB kept per
    partition: for development, demos and tests only.
    """
    from .kafka import serve_dev_broker

    _setup_logging(loglevel)
    serve_dev_broker(bootstrap_file)
