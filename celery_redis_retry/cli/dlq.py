"""``redis-retry dlq list|show|replay|purge``: the operator's commands for the dead-letter topic.

Selections (record refs, ``--all``, ``--reason``, ``--outcome``) are read here;
:mod:`celery_redis_retry.dlq.admin` does the work. ``dlq replay`` republishes records to
the retry topic; records are never deleted from Kafka.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

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



_FILTER_OPTIONS = [
    click.option("--reason", default=None, help="Only records with this reason (wrong_type, retries_exhausted...)."),
    click.option("--outcome", type=click.Choice(["dead", "rejected"]), default=None, help="Only this outcome."),
    click.option("--command", default=None, metavar="NAME",
                 help="Only ops running this command (any command of a pipeline; EVALSHA or the script's name "
                      "for scripts); any case."),
    click.option("--target", default=None, metavar="NAME", help="Only ops for this target of redis_retry_targets."),
    click.option("--key", default=None, metavar="PATTERN",
                 help="Only ops with a key matching this Redis glob ('user:*', 'order:1?')."),
    click.option("--older-than", default=None, metavar="DURATION",
                 help="Only records written at least this long ago (30s, 15m, 2h, 1d)."),
    click.option("--newer-than", default=None, metavar="DURATION",
                 help="Only records written at most this long ago (30s, 15m, 2h, 1d)."),
    click.option("--op-id", "op_ids", multiple=True, metavar="ID", help="Only this op (repeatable)."),
    click.option("--replayed/--not-replayed", default=None,
                 help="Only records of ops that died again after a dlq replay (or only first deaths)."),
]

_SELECTION = [
    click.argument("refs", nargs=-1),
    click.option("--all", "all_", is_flag=True, help="Every pending record."),
    *_FILTER_OPTIONS,
    click.option("--limit", default=0, type=click.IntRange(0), help="At most this many records, the oldest; 0: all."),
    timeout_option(),
]


_F = TypeVar("_F", bound=Callable[..., Any])


def _with(options: list[Any]) -> Callable[[_F], _F]:
    """A decorator applying ``options`` in order."""
    def decorate(command: _F) -> _F:
        for decorator in reversed(options):
            command = decorator(command)
        return command
    return decorate


def _filter_of(ctx: click.Context, options: dict[str, Any]) -> Any:
    """The :class:`DlqFilter` of the filter options; a usage error (exit 2) names a bad value."""
    from celery_redis_retry.dlq.filters import DlqFilter

    settings = settings_of(ctx)
    return DlqFilter.from_options(targets=settings.targets, scripts=settings.scripts, **options)


@dataclass(frozen=True)
class _Selection:
    """What ``dlq replay`` and ``dlq purge`` act on."""

    queue: Any  # the DeadLetterQueue
    records: Any  # every record from the cursor on
    chosen: Any  # the pending ones REFS and the filters name
    unknown: list[str]  # REFS that name no pending record


def _read_selection(
    ctx: click.Context, *, refs: tuple[str, ...], all_: bool, limit: int, timeout: float, filters: dict[str, Any],
    replays_by_choice_only: bool = False,
) -> _Selection:
    """The pending records REFS and the filters name; a usage error when nothing names any record.

    Says which REFS name no pending record, and which replays a broad selection left out.
    """
    from celery_redis_retry.dlq.filters import select

    where = _filter_of(ctx, filters)
    if not (refs or all_ or not where.empty):
        raise click.UsageError("name records (PARTITION:OFFSET or op id), or use --all or a filter (--reason...)")
    queue = _dead_letter_queue(ctx, timeout)
    records = _read_dlq(ctx, queue)
    chosen, unknown, left_out = select([s for s in records if not s.handled], refs=refs, where=where, limit=limit,
                                       replays_by_choice_only=replays_by_choice_only)
    for ref in unknown:
        click.echo(f"error: no pending record {ref!r} in {queue.topic}", err=True)
    if left_out:
        click.echo(f"note: {len(left_out)} selected records hold ops that died again after a replay; they are "
                   "replayed only when named or with --replayed", err=True)
    if not chosen:
        click.echo(f"no pending record in {queue.topic} matches")
    return _Selection(queue, records, chosen, unknown)


@click.group("dlq")
def dlq() -> None:
    """Inspect, replay and purge dead and rejected ops (redis_retry_dlq_topic).

    Records are PARTITION:OFFSET or an op id. "Pending" records are those past the
    operator cursor (consumer group <redis_retry_consumer_group>.dlq); replay and purge
    move it forward and mark records "handled". The filters (--reason, --command,
    --key, --older-than...) combine: a record must match each one given.

    Every dlq command exits 2 on a bad command line, 3 on bad settings, 4 when Kafka does
    not answer within --timeout, 5 when the DLQ topic does not exist.
    """


@dlq.command("list")
@click.option("--include-handled", is_flag=True, help="Also records already replayed or purged.")
# The flag's first name: in replay and purge --all means "every pending record", not this.
@click.option("--all", "all_alias", is_flag=True, hidden=True)
@_with(_FILTER_OPTIONS)
@click.option("--limit", default=100, show_default=True, type=click.IntRange(0), help="Most records shown; 0: all.")
@click.option("--json", "as_json", is_flag=True, help="One JSON record per line (the DLQ record plus ref and state).")
@timeout_option()
@click.pass_context
def dlq_list(  # noqa: PLR0917 - click passes every option
    ctx: click.Context, /, include_handled: bool, all_alias: bool, limit: int, as_json: bool, timeout: float,
    **filters: Any,
) -> None:
    """Pending records, oldest first in each partition (every record with --include-handled).

    A record whose op died again after a replay says where it was replayed from
    (REPLAYED FROM, "replayed_from" in JSON).

    Exits 0 (also when no record matches), 2 on a bad filter (an unknown --reason...),
    3 on bad settings, 4 when Kafka does not answer within --timeout, 5 when the DLQ
    topic does not exist.
    """
    from datetime import datetime, timezone

    from celery_redis_retry.dlq.admin import describe_op
    from celery_redis_retry.dlq.filters import select
    from celery_redis_retry.message import dumps
    from celery_redis_retry.words import counted

    if all_alias:
        click.echo("note: dlq list --all is now --include-handled", err=True)
        include_handled = True
    where = _filter_of(ctx, filters)
    queue = _dead_letter_queue(ctx, timeout)
    read = _read_dlq(ctx, queue, include_handled=include_handled)
    records = select([s for s in read if include_handled or not s.handled], where=where).chosen
    shown = records if limit == 0 else records[:limit]
    if as_json:
        for stored in shown:
            click.echo(dumps(stored.document()).decode())
        return
    click.echo(f"{'REF':<10} {'DIED AT (UTC)':<19} {'STATE':<8} {'OUTCOME':<8} {'REASON':<20} {'TRIES':>5}  "
               f"{'REPLAYED FROM':<13} {'OP ID':<28} OP")
    for stored in shown:
        letter = stored.letter
        when = datetime.fromtimestamp(stored.timestamp_ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        if letter is None:
            click.echo(f"{stored.ref:<10} {when:<19} {stored.state:<8} {'?':<8} {'undecodable':<20} {'-':>5}  "
                       f"{'-':<13} {'-':<28} {stored.problem}")
            continue
        click.echo(
            f"{stored.ref:<10} {when:<19} {stored.state:<8} {letter.outcome:<8} {letter.reason:<20} "
            f"{letter.attempts:>5}  {stored.replayed_from or '-':<13} {letter.op_id or '-':<28} "
            f"{describe_op(letter.op)}"
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

    from celery_redis_retry.dlq.filters import select
    from celery_redis_retry.message import dumps

    queue = _dead_letter_queue(ctx, timeout)
    chosen, unknown, _ = select(_read_dlq(ctx, queue, include_handled=True), refs=refs)
    for stored in chosen:
        click.echo(json.dumps(json.loads(dumps(stored.document())), indent=2))
    for ref in unknown:
        click.echo(f"error: no record {ref!r} in {queue.topic}", err=True)
    ctx.exit(EXIT_FAILURE if unknown else EXIT_OK)


@dlq.command("replay")
@_with(_SELECTION)
@click.option("--rate", type=click.FloatRange(0, min_open=True), default=None, metavar="OPS_PER_S",
              help="Republish at most this many ops a second (default: as fast as Kafka takes them).")
@click.option("--dry-run", is_flag=True,
              help="Read each op's target and say what its replay would do now; publish nothing.")
@click.pass_context
def dlq_replay(  # noqa: PLR0917 - click passes every option
    ctx: click.Context, /, refs: tuple[str, ...], all_: bool, limit: int, timeout: float, rate: float | None,
    dry_run: bool, **filters: Any,
) -> None:
    """Publish the ops of pending records to the retry topic again, attempts reset.

    Fix the cause first (a key of the wrong type, a script to register...). Replaying
    the same record twice applies it once. Rejected records are never replayed. Records
    of ops that died again after a replay are replayed only when named (REFS, --op-id)
    or with --replayed. Records are marked handled as Kafka confirms their copies, in
    chunks: a replay stopped half-way and run again loses none and applies none twice.

    --dry-run says per record "would apply", "would be superseded" (a newer write or a
    failed guard), "already applied", "expired", "would fail", "refused" or "unknown
    (target down)", reading the targets without writing to them.

    Exits 0 when every selected record was replayed (or would be, with --dry-run; also
    when no record matches the filters), 1 when a REF names no pending record or a
    selected record could not be replayed, 2 on a bad command line, 3 on bad settings,
    4 when Kafka does not answer within --timeout, 5 when the DLQ or retry topic does
    not exist.
    """
    import time

    from celery_redis_retry.cli.progress import ReplayProgress
    from celery_redis_retry.kafka import TopicMissingError
    from celery_redis_retry.words import counted

    selection = _read_selection(ctx, refs=refs, all_=all_, limit=limit, timeout=timeout, filters=filters,
                                replays_by_choice_only=True)
    queue = selection.queue
    if dry_run:
        _preview(ctx, selection)
    started = time.monotonic()
    try:
        with ReplayProgress(len(selection.chosen)) as progress:
            result, left = require_kafka_answer(
                ctx, queue.settings,
                lambda: queue.replay(selection.records, selection.chosen, rate=rate, progress=progress.update),
                timeout,
            )
    except TopicMissingError as exc:
        missing_topic(ctx, exc)
    for stored, new_id in result.republished:
        click.echo(f"replayed {stored.ref} as op {new_id}")
    for stored, why in result.refused:
        click.echo(f"error: not replayed {stored.ref}: {why}", err=True)
    took = time.monotonic() - started
    click.echo(f"{len(result.republished)} replayed to {queue.settings.topic} in {took:.2f} s, "
               f"{len(result.refused)} refused, {counted(left, 'record')} pending in {queue.topic}")
    ctx.exit(EXIT_FAILURE if result.refused or selection.unknown else EXIT_OK)


def _preview(ctx: click.Context, selection: _Selection) -> None:
    """``dlq replay --dry-run``: each record's verdict, then exit (1 if one would be refused)."""
    from collections import Counter

    from celery_redis_retry.dlq.preview import REFUSED, preview

    settings = selection.queue.settings
    verdicts = preview(settings, selection.chosen)
    for stored, verdict, detail in verdicts:
        click.echo(f"{stored.ref:<10} {verdict}: {detail}")
    counts = Counter(verdict for _s, verdict, _d in verdicts)
    refused = counts.pop(REFUSED, 0)
    tally = ", ".join(f"{n} {verdict}" for verdict, n in sorted(counts.items()))
    click.echo(f"dry run: {sum(counts.values())} would be replayed to {settings.topic}"
               f"{f' ({tally})' if tally else ''}, {refused} refused; nothing published")
    ctx.exit(EXIT_FAILURE if refused or selection.unknown else EXIT_OK)


@dlq.command("purge")
@_with(_SELECTION)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def dlq_purge(  # noqa: PLR0917 - click passes every option
    ctx: click.Context, /, refs: tuple[str, ...], all_: bool, limit: int, timeout: float, yes: bool, **filters: Any,
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

    selection = _read_selection(ctx, refs=refs, all_=all_, limit=limit, timeout=timeout, filters=filters)
    queue = selection.queue
    if selection.chosen:
        if not yes:
            click.confirm(f"purge {counted(len(selection.chosen), 'record')} of {queue.topic}?", abort=True)
        left = require_kafka_answer(ctx, queue.settings, lambda: queue.advance(selection.records, selection.chosen),
                                     timeout)
        click.echo(f"{len(selection.chosen)} purged, {counted(left, 'record')} pending in {queue.topic}")
    ctx.exit(EXIT_FAILURE if selection.unknown else EXIT_OK)
