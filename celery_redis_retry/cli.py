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
@click.option("--metrics-port", default=None, type=click.IntRange(1, 65535),
              help="Serve Prometheus metrics on this port (default: redis_retry_bridge_metrics_port, else off).")
@click.option("--loglevel", "-l", default="INFO", show_default=True, help="Logging level.")
@click.pass_context
def bridge(  # noqa: PLR0917 - click passes every option
    ctx: click.Context, batch_size: int | None, linger_ms: int | None, poll_timeout: float, group: str | None,
    metrics_port: int | None, loglevel: str,
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
        port = metrics_port or runner.settings.bridge_metrics_port
        if port is not None:
            from .metrics import serve_bridge_metrics

            serve_bridge_metrics(runner, port)
            logging.getLogger(__name__).info("serving Prometheus metrics on :%d/metrics", port)
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


# -- the dead-letter topic -----------------------------------------------------------------


def _settings(ctx: click.Context) -> Any:
    from .config import settings_for
    from .errors import ConfigurationError

    try:
        return settings_for(_app(ctx.find_root()))
    except ConfigurationError as exc:
        click.echo(f"configuration error: {exc}", err=True)
        ctx.exit(EXIT_CONFIG)


def _quiet_kafka_logs() -> None:
    # A short-lived command reports an unreachable Kafka once, in its own words; it has
    # no use for librdkafka's line per reconnect attempt.
    _setup_logging("WARNING")
    logging.getLogger("celery_redis_retry.librdkafka").setLevel(logging.CRITICAL)


def _dead_letter_queue(ctx: click.Context) -> Any:
    from .dlq_admin import DeadLetterQueue

    _quiet_kafka_logs()
    return DeadLetterQueue(_settings(ctx))


def _read_dlq(ctx: click.Context, dlq: Any, *, include_handled: bool = False) -> Any:
    from .kafka import KafkaException

    try:
        return dlq.read(include_handled=include_handled)
    except KafkaException as exc:
        click.echo(f"cannot read {dlq.topic}: {exc}", err=True)
        ctx.exit(EXIT_UNAVAILABLE)


_SELECTION = [
    click.argument("refs", nargs=-1),
    click.option("--all", "all_", is_flag=True, help="Every pending record."),
    click.option("--reason", default=None, help="Only records with this reason (e.g. wrong_type)."),
    click.option("--outcome", type=click.Choice(["dead", "rejected"]), default=None, help="Only this outcome."),
]


def _selection(command: Any) -> Any:
    for decorator in reversed(_SELECTION):
        command = decorator(command)
    return command


def _read_selection(
    ctx: click.Context, *, refs: tuple[str, ...], all_: bool, reason: str | None, outcome: str | None
) -> tuple[Any, Any, Any]:
    """The DLQ, the records from its cursor on, and the pending ones REFS and the filters name.

    A usage error when nothing names any record.
    """
    from .dlq_admin import select

    if not (refs or all_ or reason or outcome):
        raise click.UsageError("name records (PARTITION:OFFSET or op id), or use --all, --reason or --outcome")
    queue = _dead_letter_queue(ctx)
    records = _read_dlq(ctx, queue)
    chosen, unknown = select([s for s in records if not s.handled], refs=refs, reason=reason, outcome=outcome)
    for ref in unknown:
        click.echo(f"no pending record {ref!r}", err=True)
    return queue, records, chosen


@redis_retry.group("dlq")
def dlq() -> None:
    """Inspect, replay and purge dead and rejected ops (redis_retry_dlq_topic).

    Records are PARTITION:OFFSET or an op id. "Pending" records are those past the
    operator cursor (consumer group <redis_retry_consumer_group>.dlq); replay and purge
    move it forward.
    """


@dlq.command("list")
@click.option("--all", "include_handled", is_flag=True, help="Also records already replayed or purged.")
@click.option("--reason", default=None, help="Only records with this reason.")
@click.option("--outcome", type=click.Choice(["dead", "rejected"]), default=None, help="Only this outcome.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(0), help="Most records shown; 0: all.")
@click.option("--json", "as_json", is_flag=True, help="One JSON record per line (the DLQ record plus ref).")
@click.pass_context
def dlq_list(  # noqa: PLR0917 - click passes every option
    ctx: click.Context, include_handled: bool, reason: str | None, outcome: str | None, limit: int, as_json: bool
) -> None:
    """Pending records, oldest first in each partition."""
    from datetime import datetime, timezone

    from .dlq_admin import describe_op, select
    from .message import dumps

    queue = _dead_letter_queue(ctx)
    read = _read_dlq(ctx, queue, include_handled=include_handled)
    records, _ = select([s for s in read if include_handled or not s.handled], reason=reason, outcome=outcome)
    shown = records if limit == 0 else records[:limit]
    if as_json:
        for stored in shown:
            click.echo(dumps(stored.document()).decode())
        return
    click.echo(f"{'REF':<10} {'DIED AT (UTC)':<19} {'STATE':<8} {'OUTCOME':<8} {'REASON':<20} {'TRIES':>5}  "
               f"{'OP ID':<28} OP")
    for stored in shown:
        letter = stored.letter
        when = datetime.fromtimestamp(stored.timestamp_ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        state = "handled" if stored.handled else "pending"
        if letter is None:
            click.echo(f"{stored.ref:<10} {when:<19} {state:<8} {'?':<8} {'undecodable':<20} {'-':>5}  {'-':<28} "
                       f"{stored.problem}")
            continue
        click.echo(
            f"{stored.ref:<10} {when:<19} {state:<8} {letter.outcome:<8} {letter.reason:<20} {letter.attempts:>5}  "
            f"{letter.op_id or '-':<28} {describe_op(letter.op)}"
        )
    what = ("record" if include_handled else "pending record") + ("" if len(records) == 1 else "s")
    more = f", {len(shown)} shown" if len(shown) < len(records) else ""
    click.echo(f"{len(records)} {what}{more} in {queue.topic}")


@dlq.command("show")
@click.argument("refs", nargs=-1, required=True)
@click.pass_context
def dlq_show(ctx: click.Context, refs: tuple[str, ...]) -> None:
    """Whole records (op, error, traceback, origin) as JSON, replayed or not."""
    import json

    from .dlq_admin import select
    from .message import dumps

    queue = _dead_letter_queue(ctx)
    chosen, unknown = select(_read_dlq(ctx, queue, include_handled=True), refs=refs)
    for stored in chosen:
        click.echo(json.dumps(json.loads(dumps(stored.document())), indent=2))
    for ref in unknown:
        click.echo(f"no record {ref!r} in {queue.topic}", err=True)
    ctx.exit(EXIT_FAILURE if unknown else EXIT_OK)


@dlq.command("replay")
@_selection
@click.option("--dry-run", is_flag=True, help="Say what would be replayed; publish nothing.")
@click.pass_context
def dlq_replay(  # noqa: PLR0917 - click passes every option
    ctx: click.Context, refs: tuple[str, ...], all_: bool, reason: str | None, outcome: str | None, dry_run: bool
) -> None:
    """Publish the ops of pending records to the retry topic again, attempts reset.

    Fix the cause first (a key of the wrong type, a script to register...). Replaying
    the same record twice applies it once. Rejected records are never replayed.
    Exits 1 if some selected record could not be replayed.
    """
    queue, records, chosen = _read_selection(ctx, refs=refs, all_=all_, reason=reason, outcome=outcome)
    if dry_run:
        for stored in chosen:
            click.echo(f"would replay {stored.ref} (op {stored.op_id})")
        return
    result = queue.replay(chosen)
    for stored, new_id in result.replayed:
        click.echo(f"replayed {stored.ref} as op {new_id}")
    for stored, why in result.refused:
        click.echo(f"not replayed {stored.ref}: {why}", err=True)
    left = queue.advance(records, [s for s, _ in result.replayed])
    click.echo(f"{len(result.replayed)} replayed to {queue.settings.topic}, {len(result.refused)} refused, "
               f"{left} pending in {queue.topic}")
    ctx.exit(EXIT_FAILURE if result.refused else EXIT_OK)


@dlq.command("purge")
@_selection
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def dlq_purge(  # noqa: PLR0917 - click passes every option
    ctx: click.Context, refs: tuple[str, ...], all_: bool, reason: str | None, outcome: str | None, yes: bool
) -> None:
    """Mark pending records as dealt with, without replaying them.

    The records stay in Kafka (until its retention removes them) and ``dlq list --all``
    and ``dlq show`` still find them.
    """
    queue, records, chosen = _read_selection(ctx, refs=refs, all_=all_, reason=reason, outcome=outcome)
    if not chosen:
        click.echo("nothing to purge")
        return
    if not yes:
        click.confirm(f"purge {len(chosen)} records of {queue.topic}?", abort=True)
    left = queue.advance(records, chosen)
    click.echo(f"{len(chosen)} purged, {left} pending in {queue.topic}")


# -- status ----------------------------------------------------------------------------------


@redis_retry.command("status")
@click.option("--json", "as_json", is_flag=True, help="The figures as one JSON object.")
@click.option("--timeout", default=10.0, show_default=True, type=click.FloatRange(0.5), help="Seconds per query.")
@click.pass_context
def status(ctx: click.Context, as_json: bool, timeout: float) -> None:
    """Where ops wait: spool, retry topic (lag), Celery queue, DLQ. Exits 4 if a place is unreachable."""
    from .message import dumps
    from .status import collect

    _quiet_kafka_logs()
    figures = collect(_app(ctx), _settings(ctx), timeout=timeout)
    if as_json:
        click.echo(dumps(figures.document()).decode())
    else:
        def shown(value: object) -> str:
            return "unknown" if value is None else str(value)

        click.echo(f"spool        {figures.spool_messages} messages in {figures.spool_path}")
        click.echo(f"retry topic  {figures.topic}: lag {shown(figures.lag)} (group {figures.group})")
        for partition, offsets in sorted((figures.partitions or {}).items()):
            click.echo(f"  partition {partition}: end {offsets.high}, committed {offsets.committed}, lag {offsets.lag}")
        click.echo(f"celery queue {figures.queue}: {shown(figures.queued_tasks)} tasks waiting")
        click.echo(f"dlq          {figures.dlq_topic}: {shown(figures.dlq_pending)} pending")
        for place, error in figures.errors.items():
            click.echo(f"error        {place}: {error}", err=True)
    ctx.exit(EXIT_OK if figures.healthy else EXIT_UNAVAILABLE)


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
