"""Command line: ``celery -A proj redis-retry ...`` and the standalone ``celery-redis-retry``.

``redis-retry`` plugs into the ``celery`` command through the ``celery.commands`` entry
point, the way Flower does: the app comes from ``celery -A``, and Celery's own options
(``--broker``, ``--loglevel``...) keep working. Heavy imports live inside the command
bodies so that ``celery --help`` stays fast. Only this module configures logging.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click

from celery_redis_retry.names import EXIT_CONFIG, EXIT_FAILURE, EXIT_NO_TOPIC, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE

_F = TypeVar("_F", bound=Callable[..., Any])

#: Seconds a command waits for Kafka to answer each request, unless --timeout says otherwise.
KAFKA_TIMEOUT = 10.0


def _setup_logging(level: str, logfile: str | None = None) -> None:
    """Log at ``level`` to stderr, or to ``logfile`` (appended) when given."""
    handler = logging.FileHandler(logfile) if logfile else logging.StreamHandler(sys.stderr)
    logging.basicConfig(
        level=level.upper(),
        format="[%(asctime)s: %(levelname)s/%(processName)s] %(name)s: %(message)s",
        handlers=[handler],
    )


def _timeout_option(default: float = KAFKA_TIMEOUT, what: str = "each request") -> Callable[[_F], _F]:
    """``--timeout SECONDS``: how long Kafka has to answer before the command gives up with exit 4."""
    return click.option("--timeout", default=default, show_default=True, type=click.FloatRange(0.5),
                        metavar="SECONDS", help=f"Seconds Kafka has to answer {what}; then the command exits 4.")


def _app_name(ctx: click.Context) -> str:
    """The ``celery -A`` argument, to show the exact command that creates a missing topic."""
    return str(ctx.find_root().params.get("app") or "<app>")


def _kafka_silent(ctx: click.Context, settings: Any, timeout: float) -> None:
    """Say that Kafka did not answer, naming its bootstrap servers, and exit 4."""
    from celery_redis_retry.kafka import no_answer_message

    click.echo(f"error: {no_answer_message(settings.kafka, timeout)}", err=True)
    ctx.exit(EXIT_UNAVAILABLE)


def _missing_topic(ctx: click.Context, exc: Any) -> None:
    """Report a :class:`~celery_redis_retry.kafka.TopicMissingError` and exit 5."""
    click.echo(f"error: {exc.explain(_app_name(ctx))}", err=True)
    ctx.exit(EXIT_NO_TOPIC)


def _app(ctx: click.Context) -> Any:
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
@click.option("--logfile", "-f", default=None, type=click.Path(dir_okay=False, writable=True),
              help="Log to this file (appended) instead of stderr.")
@click.option("--pidfile", default=None, type=click.Path(dir_okay=False, writable=True),
              help="Write the process id to this file at start and remove it at exit; refuse to start "
                   "while it names a running process.")
@click.pass_context
def bridge(  # noqa: PLR0917 - click passes every option
    ctx: click.Context, batch_size: int | None, linger_ms: int | None, poll_timeout: float, group: str | None,
    metrics_port: int | None, loglevel: str, logfile: str | None, pidfile: str | None,
) -> None:
    """Feed ops from Kafka to Celery replay tasks until SIGTERM/SIGINT.

    Run several to scale out: they share the consumer group. Exits 0 after a graceful
    stop, 1 when --pidfile names a running process, 3 on bad settings, 4 when Kafka or
    the Celery broker is unreachable at start, 5 when the retry topic or the DLQ topic
    does not exist (see: redis-retry topics create).
    """
    app = _app(ctx)
    lock = _pidlock(ctx, pidfile) if pidfile else None
    try:
        _setup_logging(loglevel, logfile)
        _run_bridge(ctx, app, metrics_port, group=group, batch_size=batch_size, linger_ms=linger_ms,
                    poll_timeout=poll_timeout)
    finally:
        if lock is not None:
            lock.release()


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


def _run_bridge(ctx: click.Context, app: Any, metrics_port: int | None, **options: Any) -> None:
    from celery_redis_retry.bridge.loop import Bridge, BridgeUnavailableError
    from celery_redis_retry.errors import ConfigurationError
    from celery_redis_retry.kafka import TopicMissingError

    try:
        runner = Bridge(app, **options)
        port = metrics_port or runner.settings.bridge_metrics_port
        if port is not None:
            from celery_redis_retry.metrics import serve_bridge_metrics

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
    except TopicMissingError as exc:
        click.echo(f"cannot start the bridge: {exc.explain(_app_name(ctx))}", err=True)
        ctx.exit(EXIT_NO_TOPIC)


@redis_retry.group("spool")
def spool() -> None:
    """Inspect and drain this host's local spool (ops Kafka could not take)."""


def _spool_producer(ctx: click.Context) -> Any:
    from celery_redis_retry.capture.producer import RetryProducer
    from celery_redis_retry.config import settings_for
    from celery_redis_retry.errors import ConfigurationError

    try:
        return RetryProducer(settings_for(_app(ctx)), handle_sigterm=False)
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

    _quiet_kafka_logs()
    producer = _spool_producer(ctx.find_root())
    before = producer.spool.count()
    if before:
        _require_kafka_answer(ctx, producer.settings, lambda: cluster_metadata(
            new_producer(producer.settings.kafka), timeout=timeout), timeout)
    left = producer.drain(timeout)
    missing = producer.topic_missing
    producer.close()
    click.echo(f"drained {counted(before - left, 'message')}, {left} left in {producer.spool.path}")
    if left and missing is not None:
        click.echo(f"error: topic {missing!r} does not exist; create it with: "
                   f"celery -A {_app_name(ctx)} redis-retry topics create", err=True)
        ctx.exit(EXIT_NO_TOPIC)
    ctx.exit(EXIT_OK if left == 0 else EXIT_FAILURE)


# -- the dead-letter topic -----------------------------------------------------------------


def _settings(ctx: click.Context) -> Any:
    from celery_redis_retry.config import settings_for
    from celery_redis_retry.errors import ConfigurationError

    try:
        return settings_for(_app(ctx.find_root()))
    except ConfigurationError as exc:
        click.echo(f"configuration error: {exc}", err=True)
        ctx.exit(EXIT_CONFIG)


def _require_kafka_answer(ctx: click.Context, settings: Any, call: Any, timeout: float) -> Any:
    """``call()``'s result; exit 4, naming Kafka's address, when Kafka does not answer in time."""
    from celery_redis_retry.kafka import KafkaException, did_not_answer

    try:
        return call()
    except KafkaException as exc:
        if not did_not_answer(exc):
            raise
        _kafka_silent(ctx, settings, timeout)


def _quiet_kafka_logs() -> None:
    # A short-lived command reports an unreachable Kafka once, in its own words; it has
    # no use for librdkafka's line per reconnect attempt.
    _setup_logging("WARNING")
    logging.getLogger("celery_redis_retry.librdkafka").setLevel(logging.CRITICAL)


def _dead_letter_queue(ctx: click.Context, timeout: float) -> Any:
    from celery_redis_retry.dlq.admin import DeadLetterQueue

    _quiet_kafka_logs()
    return DeadLetterQueue(_settings(ctx), timeout=timeout)


def _read_dlq(ctx: click.Context, dlq: Any, *, include_handled: bool = False) -> Any:
    """The DLQ's records; exit 4 when Kafka does not answer, 5 when the DLQ topic does not exist."""
    from celery_redis_retry.kafka import KafkaException, TopicMissingError

    try:
        return _require_kafka_answer(ctx, dlq.settings, lambda: dlq.read(include_handled=include_handled),
                                     dlq.timeout)
    except TopicMissingError as exc:
        _missing_topic(ctx, exc)
    except KafkaException as exc:
        click.echo(f"error: cannot read {dlq.topic}: {exc}", err=True)
        ctx.exit(EXIT_UNAVAILABLE)


def _known_reason(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """Refuse a --reason no DLQ record can carry (a typo would otherwise match nothing, silently)."""
    from celery_redis_retry.dlq.record import REASONS

    if value is not None and value not in REASONS:
        raise click.BadParameter(f"{value!r} is no DLQ reason; the reasons are: {', '.join(sorted(REASONS))}")
    return value


_REASON_OPTION = click.option("--reason", default=None, callback=_known_reason,
                              help="Only records with this reason (wrong_type, retries_exhausted...).")
_OUTCOME_OPTION = click.option("--outcome", type=click.Choice(["dead", "rejected"]), default=None,
                               help="Only this outcome.")

_SELECTION = [
    click.argument("refs", nargs=-1),
    click.option("--all", "all_", is_flag=True, help="Every pending record."),
    _REASON_OPTION,
    _OUTCOME_OPTION,
    _timeout_option(),
]


def _selection(command: Any) -> Any:
    for decorator in reversed(_SELECTION):
        command = decorator(command)
    return command


@dataclass(frozen=True)
class _Selection:
    """What ``dlq replay`` and ``dlq purge`` act on."""

    queue: Any  # the DeadLetterQueue
    records: Any  # every record from the cursor on
    chosen: Any  # the pending ones REFS and the filters name
    unknown: list[str]  # REFS that name no pending record


def _read_selection(
    ctx: click.Context, *, refs: tuple[str, ...], all_: bool, reason: str | None, outcome: str | None,
    timeout: float,
) -> _Selection:
    """The pending records REFS and the filters name; a usage error when nothing names any record.

    Says which REFS name no pending record.
    """
    from celery_redis_retry.dlq.admin import select

    if not (refs or all_ or reason or outcome):
        raise click.UsageError("name records (PARTITION:OFFSET or op id), or use --all, --reason or --outcome")
    queue = _dead_letter_queue(ctx, timeout)
    records = _read_dlq(ctx, queue)
    chosen, unknown = select([s for s in records if not s.handled], refs=refs, reason=reason, outcome=outcome)
    for ref in unknown:
        click.echo(f"error: no pending record {ref!r} in {queue.topic}", err=True)
    if not chosen:
        click.echo(f"no pending record in {queue.topic} matches")
    return _Selection(queue, records, chosen, unknown)


@redis_retry.group("dlq")
def dlq() -> None:
    """Inspect, replay and purge dead and rejected ops (redis_retry_dlq_topic).

    Records are PARTITION:OFFSET or an op id. "Pending" records are those past the
    operator cursor (consumer group <redis_retry_consumer_group>.dlq); replay and purge
    move it forward and mark records "handled".

    Every dlq command exits 2 on a bad command line, 3 on bad settings, 4 when Kafka does
    not answer within --timeout, 5 when the DLQ topic does not exist.
    """


@dlq.command("list")
@click.option("--include-handled", is_flag=True, help="Also records already replayed or purged.")
# The flag's first name: in replay and purge --all means "every pending record", not this.
@click.option("--all", "all_alias", is_flag=True, hidden=True)
@_REASON_OPTION
@_OUTCOME_OPTION
@click.option("--limit", default=100, show_default=True, type=click.IntRange(0), help="Most records shown; 0: all.")
@click.option("--json", "as_json", is_flag=True, help="One JSON record per line (the DLQ record plus ref and state).")
@_timeout_option()
@click.pass_context
def dlq_list(  # noqa: PLR0917 - click passes every option
    ctx: click.Context, include_handled: bool, all_alias: bool, reason: str | None, outcome: str | None, limit: int,
    as_json: bool, timeout: float,
) -> None:
    """Pending records, oldest first in each partition (every record with --include-handled).

    Exits 0 (also when no record matches), 2 on an unknown --reason, 3 on bad settings,
    4 when Kafka does not answer within --timeout, 5 when the DLQ topic does not exist.
    """
    from datetime import datetime, timezone

    from celery_redis_retry.dlq.admin import describe_op, select
    from celery_redis_retry.message import dumps
    from celery_redis_retry.words import counted

    if all_alias:
        click.echo("note: dlq list --all is now --include-handled", err=True)
        include_handled = True
    queue = _dead_letter_queue(ctx, timeout)
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
        if letter is None:
            click.echo(f"{stored.ref:<10} {when:<19} {stored.state:<8} {'?':<8} {'undecodable':<20} {'-':>5}  "
                       f"{'-':<28} {stored.problem}")
            continue
        click.echo(
            f"{stored.ref:<10} {when:<19} {stored.state:<8} {letter.outcome:<8} {letter.reason:<20} "
            f"{letter.attempts:>5}  {letter.op_id or '-':<28} {describe_op(letter.op)}"
        )
    what = counted(len(records), "record" if include_handled else "pending record")
    more = f", {len(shown)} shown" if len(shown) < len(records) else ""
    click.echo(f"{what}{more} in {queue.topic}")


@dlq.command("show")
@click.argument("refs", nargs=-1, required=True)
@_timeout_option()
@click.pass_context
def dlq_show(ctx: click.Context, refs: tuple[str, ...], timeout: float) -> None:
    """Whole records (op, error, traceback, origin) as JSON, replayed or not.

    Each record's "state" says whether it is "pending" or "handled" (replayed or purged
    already). Exits 0 when every REF names a record, 1 when one names none, 3 on bad
    settings, 4 when Kafka does not answer within --timeout, 5 when the DLQ topic does
    not exist.
    """
    import json

    from celery_redis_retry.dlq.admin import select
    from celery_redis_retry.message import dumps

    queue = _dead_letter_queue(ctx, timeout)
    chosen, unknown = select(_read_dlq(ctx, queue, include_handled=True), refs=refs)
    for stored in chosen:
        click.echo(json.dumps(json.loads(dumps(stored.document())), indent=2))
    for ref in unknown:
        click.echo(f"error: no record {ref!r} in {queue.topic}", err=True)
    ctx.exit(EXIT_FAILURE if unknown else EXIT_OK)


@dlq.command("replay")
@_selection
@click.option("--dry-run", is_flag=True, help="Say what would be replayed and what refused; publish nothing.")
@click.pass_context
def dlq_replay(  # noqa: PLR0917 - click passes every option
    ctx: click.Context, refs: tuple[str, ...], all_: bool, reason: str | None, outcome: str | None, timeout: float,
    dry_run: bool,
) -> None:
    """Publish the ops of pending records to the retry topic again, attempts reset.

    Fix the cause first (a key of the wrong type, a script to register...). Replaying
    the same record twice applies it once. Rejected records are never replayed.

    Exits 0 when every selected record was replayed (or would be, with --dry-run; also
    when no record matches the filters), 1 when a REF names no pending record or a
    selected record could not be replayed, 2 on a bad command line, 3 on bad settings,
    4 when Kafka does not answer within --timeout, 5 when the DLQ or retry topic does
    not exist.
    """
    from celery_redis_retry.kafka import TopicMissingError
    from celery_redis_retry.words import counted

    selection = _read_selection(ctx, refs=refs, all_=all_, reason=reason, outcome=outcome, timeout=timeout)
    queue = selection.queue
    if dry_run:
        ready, refused = queue.check(selection.chosen)
        for stored, op, _raw in ready:
            click.echo(f"would replay {stored.ref} (op {stored.op_id}) as op {op.id}")
        for stored, why in refused:
            click.echo(f"would not replay {stored.ref}: {why}")
        click.echo(f"dry run: {len(ready)} would be replayed to {queue.settings.topic}, {len(refused)} refused; "
                   "nothing published")
        ctx.exit(EXIT_FAILURE if refused or selection.unknown else EXIT_OK)
    try:
        result = _require_kafka_answer(ctx, queue.settings, lambda: queue.republish(selection.chosen), timeout)
    except TopicMissingError as exc:
        _missing_topic(ctx, exc)
    for stored, new_id in result.republished:
        click.echo(f"replayed {stored.ref} as op {new_id}")
    for stored, why in result.refused:
        click.echo(f"error: not replayed {stored.ref}: {why}", err=True)
    left = queue.advance(selection.records, [s for s, _ in result.republished])
    click.echo(f"{len(result.republished)} replayed to {queue.settings.topic}, {len(result.refused)} refused, "
               f"{counted(left, 'record')} pending in {queue.topic}")
    ctx.exit(EXIT_FAILURE if result.refused or selection.unknown else EXIT_OK)


@dlq.command("purge")
@_selection
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def dlq_purge(  # noqa: PLR0917 - click passes every option
    ctx: click.Context, refs: tuple[str, ...], all_: bool, reason: str | None, outcome: str | None, timeout: float,
    yes: bool,
) -> None:
    """Mark pending records as dealt with, without replaying them.

    The records stay in Kafka (until its retention removes them); "dlq list --include-handled" and
    "dlq show" still find them.

    Exits 0 when the selected records were purged (also when no record matches the
    filters), 1 when a REF names no pending record or the confirmation was declined,
    2 on a bad command line, 3 on bad settings, 4 when Kafka does not answer within
    --timeout, 5 when the DLQ topic does not exist.
    """
    from celery_redis_retry.words import counted

    selection = _read_selection(ctx, refs=refs, all_=all_, reason=reason, outcome=outcome, timeout=timeout)
    queue = selection.queue
    if selection.chosen:
        if not yes:
            click.confirm(f"purge {counted(len(selection.chosen), 'record')} of {queue.topic}?", abort=True)
        left = _require_kafka_answer(ctx, queue.settings, lambda: queue.advance(selection.records, selection.chosen),
                                     timeout)
        click.echo(f"{len(selection.chosen)} purged, {counted(left, 'record')} pending in {queue.topic}")
    ctx.exit(EXIT_FAILURE if selection.unknown else EXIT_OK)


# -- status ----------------------------------------------------------------------------------


@redis_retry.command("status")
@click.option("--json", "as_json", is_flag=True, help="The figures as one JSON object.")
@_timeout_option(what="each query")
@click.pass_context
def status(ctx: click.Context, as_json: bool, timeout: float) -> None:
    """Where ops wait: spool, retry topic (lag), Celery queue, retries held by workers, DLQ, and each target's circuit.

    A figure that could not be read shows as "unknown" (null in --json); a partition
    without a committed offset as "committed -" (null). Exits 0 when every place could
    be read, 3 on bad settings, 4 if a place is unreachable (Kafka within --timeout,
    or the Celery broker), 5 if the retry or DLQ topic does not exist.
    """
    from celery_redis_retry.cli.status import collect
    from celery_redis_retry.message import dumps
    from celery_redis_retry.words import counted

    _quiet_kafka_logs()
    settings = _settings(ctx)
    figures = collect(_app(ctx), settings, timeout=timeout)
    if as_json:
        click.echo(dumps(figures.document()).decode())
    else:
        def shown(value: object) -> str:
            return "unknown" if value is None else str(value)

        click.echo(f"spool        {counted(figures.spool_messages, 'message')} in {figures.spool_path}")
        click.echo(f"retry topic  {figures.topic}: lag {shown(figures.lag)}, not ended {shown(figures.not_ended)} "
                   f"(group {figures.group})")
        for partition, offsets in sorted((figures.partitions or {}).items()):
            committed = "-" if offsets.committed < 0 else offsets.committed
            click.echo(f"  partition {partition}: end {offsets.high}, committed {committed}, "
                       f"lag {offsets.lag}, not ended {offsets.pending}")
        click.echo(f"celery queue {figures.queue}: {counted(figures.queued_tasks, 'task')} waiting")
        click.echo(f"retrying     {_retrying_line(figures.retrying)}")
        click.echo(f"dlq          {figures.dlq_topic}: {counted(figures.dlq_pending, 'record')} pending")
        for target in figures.targets:
            why = f" ({target.reason})" if target.reason else ""
            click.echo(f"target       {target.name}: circuit {target.circuit}{why}, "
                       f"{counted(target.waiting, 'op')} waiting in {settings.waiting_topic(target.name)}")
        for place, error in figures.errors.items():
            click.echo(f"error        {place}: {error}", err=True)
        for missing in figures.missing_topics:
            click.echo(f"error        {missing.explain(_app_name(ctx))}", err=True)
    if figures.errors:
        ctx.exit(EXIT_UNAVAILABLE)
    ctx.exit(EXIT_NO_TOPIC if figures.missing_topics else EXIT_OK)


def _retrying_line(retrying: Any) -> str:
    from celery_redis_retry.words import counted

    if retrying.ops is None:
        return "unknown: no worker answered (none running, or remote control is off)"
    age = "" if retrying.oldest_age is None else f", the oldest captured {retrying.oldest_age:.0f} s ago"
    return f"{counted(retrying.ops, 'op')} held by {counted(retrying.workers, 'worker')} until their next attempt{age}"


# -- topics ----------------------------------------------------------------------------------


@redis_retry.group("topics")
def topics() -> None:
    """Create and describe the retry topic and its DLQ topic (for clusters that do not auto-create).

    Run "topics create" once per cluster, before the first producer, bridge or
    worker: production clusters run with auto.create.topics.enable=false.
    """


_PLAN_OPTIONS = [
    click.option("--partitions", default=None, type=click.IntRange(1, 10_000),
                 help="Partitions of the retry topic: the most bridges that share the work [default: 12]."),
    click.option("--dlq-partitions", default=None, type=click.IntRange(1, 10_000),
                 help="Partitions of the DLQ topic [default: 3]."),
    click.option("--replication-factor", default=None, type=click.IntRange(1, 32),
                 help="Replicas of each partition [default: 3]; the cluster needs at least as many brokers."),
    click.option("--min-insync-replicas", default=None, type=click.IntRange(1, 32),
                 help="Replicas that must have a write before it is acknowledged [default: 2, or one less "
                      "than --replication-factor below 3, at least 1]."),
    click.option("--retention-days", default=None, type=click.FloatRange(0.01),
                 help="How long the retry topic keeps ops [default: redis_retry_max_retries x "
                      "redis_retry_backoff_max + 3 days, at least 7 days]: an op must still be in Kafka "
                      "when its retries end, even after a bridge was stopped for a weekend."),
    click.option("--dlq-retention-days", default=28.0, show_default=True, type=click.FloatRange(0.01),
                 help="How long the DLQ topic keeps dead letters: the time an operator has to look at them."),
    _timeout_option(30.0),
]


def _plan_options(command: Any) -> Any:
    for decorator in reversed(_PLAN_OPTIONS):
        command = decorator(command)
    return command


def _plans(ctx: click.Context, options: dict[str, Any]) -> Any:
    from celery_redis_retry.errors import RedisRetryError
    from celery_redis_retry.kafka import topics as topic_admin

    settings = _settings(ctx)
    day_ms = topic_admin.DAY_MS

    def given(name: str, default: Any) -> Any:
        return default if options.get(name) is None else options[name]

    try:
        return settings, topic_admin.plan(
            settings,
            partitions=given("partitions", topic_admin.DEFAULT_PARTITIONS),
            dlq_partitions=given("dlq_partitions", topic_admin.DEFAULT_DLQ_PARTITIONS),
            replication_factor=given("replication_factor", topic_admin.DEFAULT_REPLICATION_FACTOR),
            min_insync_replicas=options.get("min_insync_replicas"),
            retention_ms=None if options.get("retention_days") is None else int(options["retention_days"] * day_ms),
            dlq_retention_ms=int(given("dlq_retention_days", 28.0) * day_ms),
        )
    except RedisRetryError as exc:
        raise click.UsageError(str(exc)) from None


def _ask_cluster(ctx: click.Context, settings: Any, call: Any, timeout: float) -> Any:
    """``call()``'s result; exit 2 when the cluster cannot hold the plan, 4 when Kafka does not answer."""
    from celery_redis_retry.kafka import KafkaException
    from celery_redis_retry.kafka.topics import TopicSetupError

    try:
        return _require_kafka_answer(ctx, settings, call, timeout)
    except TopicSetupError as exc:
        click.echo(f"error: {exc}", err=True)
        ctx.exit(EXIT_USAGE)
    except KafkaException as exc:
        click.echo(f"cannot reach Kafka at {settings.kafka.get('bootstrap.servers')}: {exc}", err=True)
        ctx.exit(EXIT_UNAVAILABLE)


def _echo_states(states: Any) -> None:
    """Print one line per topic, and a warning where an existing one differs from the plan."""
    from celery_redis_retry.kafka.topics import found_summary

    for state in states:
        what = f"{state.plan.role} topic {state.plan.name}"
        if state.found is not None:
            click.echo(f"{state.action:<13}{what}: {found_summary(state.found)}")
        elif state.action == "failed":
            click.echo(f"{state.action:<13}{what}: {state.error}", err=True)
        else:
            click.echo(f"{state.action:<13}{what}: {state.plan.summary()}")
        if state.differences:
            click.echo(f"warning: {what} differs from the plan, left as it is: {'; '.join(state.differences)}",
                       err=True)


@topics.command("create")
@_plan_options
@click.option("--dry-run", is_flag=True, help="Say what would be created; create nothing.")
@click.pass_context
def topics_create(ctx: click.Context, /, dry_run: bool, **options: Any) -> None:
    """Create the retry topic and its DLQ topic, if missing, with production settings.

    Topics that exist are described and left as they are (a warning says where they
    differ from what this command would create): running it again is safe. Exits 0
    once both exist, 1 if one could not be created, 2 when the cluster has fewer
    brokers than --replication-factor (or on a bad command line), 3 on bad settings,
    4 when Kafka does not answer within --timeout.
    """
    from celery_redis_retry.kafka.topics import create, plan_warnings

    _quiet_kafka_logs()
    settings, plans = _plans(ctx, options)
    for warning in plan_warnings(settings, plans):
        click.echo(f"warning: {warning}", err=True)
    timeout = options["timeout"]
    states = _ask_cluster(ctx, settings, lambda: create(settings, plans, dry_run=dry_run, timeout=timeout), timeout)
    _echo_states(states)
    ctx.exit(EXIT_FAILURE if any(s.action == "failed" for s in states) else EXIT_OK)


@topics.command("describe")
@_plan_options
@click.pass_context
def topics_describe(ctx: click.Context, /, **options: Any) -> None:
    """Say whether the retry and DLQ topics exist, how they are set up, and how that differs from the plan.

    The plan is what "topics create" with the same options would create. Creates
    nothing. Exits 0 when both exist, 2 on a bad command line, 3 on bad settings, 4 when
    Kafka does not answer within --timeout, 5 when one is missing.
    """
    from celery_redis_retry.kafka.topics import describe

    _quiet_kafka_logs()
    settings, plans = _plans(ctx, options)
    timeout = options["timeout"]
    states = _ask_cluster(ctx, settings, lambda: describe(settings, plans, timeout=timeout), timeout)
    _echo_states(states)
    if any(s.action == "missing" for s in states):
        click.echo(f"create them with: celery -A {_app_name(ctx)} redis-retry topics create", err=True)
        ctx.exit(EXIT_NO_TOPIC)


topics.add_command(topics_describe, "check")


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

    _setup_logging(loglevel)
    try:
        serve_dev_broker(bootstrap_file, port)
    except OSError as exc:
        click.echo(f"error: cannot listen on 127.0.0.1:{port}: {exc}", err=True)
        ctx.exit(EXIT_FAILURE)
