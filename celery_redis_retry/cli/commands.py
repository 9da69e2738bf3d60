"""Command line: ``celery -A proj redis-retry ...`` and the standalone ``celery-redis-retry``.

The ``bridge``, ``spool`` and ``status`` commands are here; ``dlq`` and ``topics`` live
in :mod:`celery_redis_retry.cli.dlq` and :mod:`celery_redis_retry.cli.topics`, what they
share in :mod:`celery_redis_retry.cli.common`.

``redis-retry`` plugs into the ``celery`` command through the ``celery.commands`` entry
point, the way Flower does: the app comes from ``celery -A``, and Celery's own options
(``--broker``, ``--loglevel``...) keep working. Heavy imports live inside the command
bodies so that ``celery --help`` stays fast. Only this module configures logging.
"""

from __future__ import annotations

import logging
from typing import Any

import click

from celery_redis_retry.cli.common import (
    app_name,
    celery_app,
    quiet_kafka_logs,
    require_kafka_answer,
    settings_of,
    setup_logging,
    timeout_option,
)
from celery_redis_retry.cli.dlq import dlq
from celery_redis_retry.cli.policy import policy
from celery_redis_retry.cli.target import target
from celery_redis_retry.cli.topics import topics
from celery_redis_retry.cli.ui import ui
from celery_redis_retry.names import EXIT_CONFIG, EXIT_FAILURE, EXIT_NO_TOPIC, EXIT_OK, EXIT_UNAVAILABLE


class _RedisRetryGroup(click.Group):
    """The ``redis-retry`` group: refused Kafka credentials end any command with exit 3, naming the setting."""

    def invoke(self, ctx: click.Context) -> Any:
        from celery_redis_retry.kafka import KafkaCredentialsError

        try:
            return super().invoke(ctx)
        except KafkaCredentialsError as exc:
            click.echo(f"configuration error: {exc}", err=True)
            ctx.exit(EXIT_CONFIG)


@click.group("redis-retry", cls=_RedisRetryGroup)
@click.pass_context
def redis_retry(ctx: click.Context) -> None:
    """Replay failed Redis writes from Kafka with Celery (celery_redis_retry)."""


redis_retry.add_command(dlq)
redis_retry.add_command(topics)
redis_retry.add_command(target)
redis_retry.add_command(policy)
redis_retry.add_command(ui)


@redis_retry.command("bridge")
@click.option("--batch-size", default=None, type=click.IntRange(1, 10_000),
              help="Most ops per replay task; 1 sends one task per op (default: redis_retry_batch_size).")
@click.option("--linger-ms", default=None, type=click.IntRange(0, 60_000),
              help="Longest wait for a batch to fill (default: redis_retry_batch_linger_ms).")
@click.option("--poll-timeout", default=1.0, show_default=True, type=click.FloatRange(0.01, 60),
              help="Seconds one poll waits for messages.")
@click.option("--group", default=None, help="Consumer group (default: redis_retry_consumer_group).")
@click.option("--metrics-port", default=None, type=click.IntRange(1, 65535),
              help="Serve Prometheus metrics on this port (default: redis_retry_bridge_metrics_port, else off).")
@click.option("--health-port", default=None, type=click.IntRange(1, 65535),
              help="Serve /healthz and /readyz on this port (default: redis_retry_bridge_health_port, else off).")
@click.option("--name", default=None,
              help="A name kept across restarts, unique among this host's bridges of the group: the bridge "
                   "joins as static member <host>.<name> and a restart takes its partitions back at once.")
@click.option("--loglevel", "-l", default="INFO", show_default=True, help="Logging level.")
@click.option("--log-format", default=None, type=click.Choice(["text", "json"]),
              help="text (for people) or json (one object per line; default: redis_retry_log_format).")
@click.option("--logfile", "-f", default=None, type=click.Path(dir_okay=False, writable=True),
              help="Log to this file (appended) instead of stderr.")
@click.option("--pidfile", default=None, type=click.Path(dir_okay=False, writable=True),
              help="Write the process id to this file at start and remove it at exit; refuse to start "
                   "while it names a running process.")
@click.pass_context
def bridge(  # noqa: PLR0917 - click passes every option
    ctx: click.Context, batch_size: int | None, linger_ms: int | None, poll_timeout: float, group: str | None,
    metrics_port: int | None, health_port: int | None, name: str | None, loglevel: str, log_format: str | None,
    logfile: str | None, pidfile: str | None,
) -> None:
    """Feed ops from Kafka to Celery replay tasks until SIGTERM/SIGINT.

    Run several to scale out: they share the consumer group. Exits 0 after a graceful
    stop, 1 when --pidfile names a running process, 3 on bad settings, 4 when Kafka or
    the Celery broker is unreachable at start, 5 when the retry topic or the DLQ topic
    does not exist (see: redis-retry topics create).
    """
    app = celery_app(ctx)
    lock = _pidlock(ctx, pidfile) if pidfile else None
    try:
        setup_logging(loglevel, logfile, log_format or _settings_log_format(app))
        _run_bridge(ctx, app, metrics_port, health_port, group=group, batch_size=batch_size, linger_ms=linger_ms,
                    poll_timeout=poll_timeout, name=name)
    finally:
        if lock is not None:
            lock.release()


def _settings_log_format(app: Any) -> str:
    """``redis_retry_log_format``, or "text" when the settings are bad (the bridge then reports them)."""
    from celery_redis_retry.config import settings_for
    from celery_redis_retry.errors import ConfigurationError

    try:
        return settings_for(app).log_format
    except ConfigurationError:
        return "text"


def _pidlock(ctx: click.Context, pidfile: str) -> Any:
    """Celery's pid lock on ``pidfile``: a stale file (its process is gone) is replaced; exit 1
    when it names a running process."""
    from celery.platforms import Pidfile

    lock = Pidfile(pidfile)
    if lock.is_locked() and not lock.remove_if_stale():
        click.echo(f"error: pidfile {pidfile} names process {lock.read_pid()}, which is running: "
                   "another bridge? Stop it, or remove the file if that process is no bridge.", err=True)
        ctx.exit(EXIT_FAILURE)
    return lock.acquire()


def _run_bridge(ctx: click.Context, app: Any, metrics_port: int | None, health_port: int | None,
                **options: Any) -> None:
    from celery_redis_retry.bridge.loop import Bridge
    from celery_redis_retry.errors import BridgeUnavailableError, ConfigurationError
    from celery_redis_retry.kafka import TopicMissingError

    try:
        runner = Bridge(app, **options)
        port = metrics_port or runner.settings.bridge_metrics_port
        if port is not None:
            from celery_redis_retry.metrics import serve_bridge_metrics

            serve_bridge_metrics(runner, port)
            logging.getLogger(__name__).info("serving Prometheus metrics on :%d/metrics", port)
        health_port = health_port or runner.settings.bridge_health_port
        if health_port is not None:
            from celery_redis_retry.bridge.health import serve_health

            serve_health(runner, health_port)
            logging.getLogger(__name__).info("serving health checks on :%d/healthz and /readyz", health_port)
        runner.install_signal_handlers()
        runner.run()
    except ConfigurationError as exc:
        click.echo(f"configuration error: {exc}", err=True)
        ctx.exit(EXIT_CONFIG)
    except BridgeUnavailableError as exc:
        click.echo(f"cannot start the bridge: {exc}", err=True)
        ctx.exit(EXIT_UNAVAILABLE)
    except TopicMissingError as exc:
        click.echo(f"cannot start the bridge: {exc.explain(app_name(ctx))}", err=True)
        ctx.exit(EXIT_NO_TOPIC)


@redis_retry.group("spool")
def spool() -> None:
    """Inspect and drain this host's local spool (ops Kafka could not take)."""


def _spool_producer(ctx: click.Context) -> Any:
    from celery_redis_retry.capture.producer import RetryProducer
    from celery_redis_retry.config import settings_for
    from celery_redis_retry.errors import ConfigurationError

    try:
        return RetryProducer(settings_for(celery_app(ctx)), handle_sigterm=False)
    except ConfigurationError as exc:
        click.echo(f"configuration error: {exc}", err=True)
        ctx.exit(EXIT_CONFIG)


@spool.command("status")
@click.pass_context
def spool_status(ctx: click.Context) -> None:
    """Messages waiting in the spool, their size and age, and who drains them.

    Reads the local spool file only. Exits 0, or 3 on bad settings.
    """
    import time

    status = _spool_producer(ctx.find_root()).spool.status()
    age = f"{time.time() - status.oldest_at:.0f} s" if status.oldest_at is not None else "-"
    click.echo(f"spool:     {status.path}")
    click.echo(f"messages:  {status.messages}")
    click.echo(f"size:      {status.bytes} of {status.max_bytes} bytes ({100 * status.bytes / status.max_bytes:.1f}%)")
    click.echo(f"oldest:    {age}")
    click.echo(f"draining:  {status.lease_owner or '-'}")


@spool.command("drain")
@click.option("--timeout", default=60.0, show_default=True, type=click.FloatRange(1), metavar="SECONDS",
              help="Seconds Kafka has to answer, and the longest the drain goes on.")
@click.pass_context
def spool_drain(ctx: click.Context, timeout: float) -> None:
    """Republish the spool to Kafka now.

    Exits 0 once it is empty, 1 if messages remain, 3 on bad settings, 4 when Kafka
    does not answer within --timeout, 5 when the retry topic does not exist.
    """
    from celery_redis_retry.kafka import cluster_metadata, new_producer
    from celery_redis_retry.words import counted

    quiet_kafka_logs()
    producer = _spool_producer(ctx.find_root())
    before = producer.spool.count()
    if before:
        require_kafka_answer(ctx, producer.settings, lambda: cluster_metadata(
            new_producer(producer.settings.kafka), timeout=timeout), timeout)
    left = producer.drain(timeout)
    missing = producer.topic_missing
    producer.close()
    click.echo(f"drained {counted(before - left, 'message')}, {left} left in {producer.spool.path}")
    if left and missing is not None:
        click.echo(f"error: topic {missing!r} does not exist; create it with: "
                   f"celery -A {app_name(ctx)} redis-retry topics create", err=True)
        ctx.exit(EXIT_NO_TOPIC)
    ctx.exit(EXIT_OK if left == 0 else EXIT_FAILURE)


# -- the dead-letter topic -----------------------------------------------------------------


# -- status ----------------------------------------------------------------------------------


@redis_retry.command("status")
@click.option("--json", "as_json", is_flag=True, help="The figures as one JSON object.")
@click.option("--watch", is_flag=True, help="Refresh every --interval seconds until Ctrl-C (then exit 0).")
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(0.1), metavar="SECONDS",
              help="Seconds between two refreshes of --watch.")
@timeout_option(what="each query")
@click.pass_context
def status(ctx: click.Context, as_json: bool, watch: bool, interval: float, timeout: float) -> None:
    """Where ops wait: spool, retry topic (lag), Celery queue, retries held by workers, DLQ, and each target's
    circuit and pause.

    A figure that could not be read shows as "unknown" (null in --json); a partition
    without a committed offset as "committed -" (null). Exits 0 when every place could
    be read, 3 on bad settings, 4 if a place is unreachable (Kafka within --timeout,
    or the Celery broker), 5 if the retry or DLQ topic does not exist. With --watch it
    redraws in place on a terminal (one frame per interval, separated by a blank line,
    otherwise) and exits 0 on Ctrl-C.
    """
    from celery_redis_retry.cli.status import collect, frame, watch_frames

    quiet_kafka_logs()
    settings = settings_of(ctx)
    app = celery_app(ctx)
    if watch:
        watch_frames(lambda: frame(collect(app, settings, timeout=timeout), settings, app_name(ctx), as_json=as_json),
                     interval)
        ctx.exit(EXIT_OK)
    figures = collect(app, settings, timeout=timeout)
    out, err = frame(figures, settings, app_name(ctx), as_json=as_json)
    for line in out:
        click.echo(line)
    for line in err:
        click.echo(line, err=True)
    if figures.errors:
        ctx.exit(EXIT_UNAVAILABLE)
    ctx.exit(EXIT_NO_TOPIC if figures.missing_topics else EXIT_OK)


# -- the standalone command ----------------------------------------------------------------


@click.group("celery-redis-retry")
@click.version_option(package_name="celery-redis-retry")
def main() -> None:
    """Development tools of celery_redis_retry (the runtime commands live under: celery -A proj redis-retry)."""


@main.command("dev-kafka")
@click.option(
    "--bootstrap-file",
    type=click.Path(dir_okay=False, writable=True),
    help="Also write HOST:PORT to this file once the broker listens.",
)
@click.option("--port", default=None, type=click.IntRange(1, 65535),
              help="Bootstrap port on 127.0.0.1 that stays the same across restarts (default: a random port).")
@click.option("--loglevel", "-l", default="WARNING", show_default=True, help="Logging level.")
@click.pass_context
def dev_kafka(ctx: click.Context, bootstrap_file: str | None, port: int | None, loglevel: str) -> None:
    """Run an embedded Kafka broker (librdkafka's mock cluster) until SIGINT/SIGTERM.

    Prints bootstrap.servers=HOST:PORT first. In-memory, about 5 MiB kept per
    partition: for development, demos and tests only.

    librdkafka cannot fix the port its mock broker listens on: with --port, clients
    bootstrap through 127.0.0.1:PORT, which relays to the broker, and then talk to the
    broker's own (random) port, as Kafka clients do. After a restart a new client
    finds the broker at the same bootstrap address; a client that stays up across the
    restart reconnects once librdkafka bootstraps again. Exits 0 on SIGINT/SIGTERM,
    1 when --port cannot be bound.
    """
    from celery_redis_retry.kafka import serve_dev_broker

    setup_logging(loglevel)
    try:
        serve_dev_broker(bootstrap_file, port)
    except OSError as exc:
        click.echo(f"error: cannot listen on 127.0.0.1:{port}: {exc}", err=True)
        ctx.exit(EXIT_FAILURE)
