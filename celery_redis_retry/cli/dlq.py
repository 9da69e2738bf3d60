"""``redis-retry dlq list|show|replay|purge``: the operator's commands for the dead-letter topic.

Selections (record refs, ``--all``, ``--reason``, ``--outcome``) are read here;
:mod:`celery_redis_retry.dlq.admin` does the work. ``dlq replay`` republishes records to
the retry topic; records are never deleted from Kafka.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import click

from celery_redis_retry.cli.common import (
    missing_topic,
    quiet_kafka_logs,
    require_kafka_answer,
    settings_of,
    timeout_option,
)
from celery_redis_retry.names import EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE


def _dead_letter_queue(ctx: click.Context, timeout: float) -> Any:
    from celery_redis_retry.dlq.admin import DeadLetterQueue

    quiet_kafka_logs()
    return DeadLetterQueue(settings_of(ctx), timeout=timeout)


def _read_dlq(ctx: click.Context, dlq: Any, *, include_handled: bool = False) -> Any:
    """The DLQ's records; exit 4 when Kafka does not answer, 5 when the DLQ topic does not exist."""
    from celery_redis_retry.kafka import KafkaException, TopicMissingError

    try:
        return require_kafka_answer(ctx, dlq.settings, lambda: dlq.read(include_handled=include_handled),
                                     dlq.timeout)
    except TopicMissingError as exc:
        missing_topic(ctx, exc)
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
    timeout_option(),
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


@click.group("dlq")
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
@timeout_option()
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
@timeout_option()
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
        result, left = require_kafka_answer(
            ctx, queue.settings, lambda: queue.replay(selection.records, selection.chosen), timeout)
    except TopicMissingError as exc:
        missing_topic(ctx, exc)
    for stored, new_id in result.republished:
        click.echo(f"replayed {stored.ref} as op {new_id}")
    for stored, why in result.refused:
        click.echo(f"error: not replayed {stored.ref}: {why}", err=True)
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
        left = require_kafka_answer(ctx, queue.settings, lambda: queue.advance(selection.records, selection.chosen),
                                     timeout)
        click.echo(f"{len(selection.chosen)} purged, {counted(left, 'record')} pending in {queue.topic}")
    ctx.exit(EXIT_FAILURE if selection.unknown else EXIT_OK)
