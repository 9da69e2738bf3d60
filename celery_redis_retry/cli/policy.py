"""``redis-retry policy set|list|delete``: retry policy rules, changed at run time.

A rule is a record in the compacted control topic (:mod:`celery_redis_retry.control`):
every bridge and worker follows it and applies it at the op's next attempt, ops already
in flight included. Exit codes as the other commands: 2 a bad command line or an invalid
rule (the message names the field), 3 bad settings, 4 Kafka does not answer (or does not
confirm the record), 5 the control topic does not exist, 1 ``delete`` of a rule not in force.
"""

from __future__ import annotations

import time
from typing import Any

import click

from celery_redis_retry.cli.common import (
    celery_app,
    quiet_kafka_logs,
    require_kafka_answer,
    settings_of,
    timeout_option,
    write_control,
)


@click.group("policy")
def policy() -> None:
    """Set, list and delete retry policy rules: the retry limit, backoff, deadline and
    priority of the ops a rule matches, for every bridge and worker, without a restart.

    When several rules match an op, the lowest --order wins (ties by name). What the
    winning rule sets beats the op's own max_retries and deadline and the settings;
    what it leaves out comes from them.
    """


@policy.command("set")
@click.argument("name")
@click.option("--target", help="Match ops of this target only.")
@click.option("--command", "command_name", metavar="COMMAND", help="Match ops with this Redis command (any case).")
@click.option("--key", metavar="GLOB", help="Match ops whose first key matches this glob (session:*).")
@click.option("--source", metavar="GLOB", help="Match ops whose source matches this glob.")
@click.option("--max-retries", type=int, help="Retries an op may have for failures of its own.")
@click.option("--backoff", type=float, metavar="SECONDS", help="Backoff factor: FACTOR * 2**attempt seconds.")
@click.option("--backoff-max", type=float, metavar="SECONDS", help="Cap of one countdown, in seconds.")
@click.option("--deadline", type=float, metavar="SECONDS",
              help="Seconds after capture past which an op ends expired (replaces its own deadline and "
                   "redis_retry_max_age).")
@click.option("--priority", help="critical or ordinary: the bridge's lane for the ops.")
@click.option("--order", type=int, default=100, show_default=True, help="Lowest wins when several rules match.")
@timeout_option()
@click.pass_context
def policy_set(ctx: click.Context, /, name: str, command_name: str | None, timeout: float, **fields: Any) -> None:
    """Set rule NAME (replacing the rule of that name) and print what was stored.

    Exits 0 once Kafka confirmed it, 2 on an invalid rule (the message names the field),
    3 on bad settings, 4 when Kafka does not answer within --timeout, 5 when the control
    topic does not exist (see: redis-retry topics create).
    """
    from celery_redis_retry import control
    from celery_redis_retry.errors import PolicyRuleError
    from celery_redis_retry.retry_policy import PolicyRule

    try:
        rule = PolicyRule.parse({"name": name, "command": command_name, **fields})
    except PolicyRuleError as exc:
        raise click.UsageError(str(exc)) from None
    conf = celery_app(ctx.find_root()).conf
    record = write_control(ctx, timeout, lambda settings: control.set_policy(settings, rule, broker_conf=conf,
                                                                       timeout=timeout))
    click.echo(f"rule {record_line(record)}")


@policy.command("delete")
@click.argument("name")
@timeout_option()
@click.pass_context
def policy_delete(ctx: click.Context, name: str, timeout: float) -> None:
    """Delete rule NAME: the ops it matched follow the other rules, or the settings, from their next attempt.

    Exits 0 once Kafka confirmed it, 1 when no rule NAME is in force, 3 on bad settings,
    4 when Kafka does not answer within --timeout, 5 when the control topic does not exist.
    """
    from celery_redis_retry import control

    record = write_control(ctx, timeout, lambda settings: control.delete_policy(settings, name, timeout=timeout))
    click.echo(f"rule {record.rule.name} deleted (it was: {record.rule.describe()})")


@policy.command("list")
@click.option("--json", "as_json", is_flag=True, help="The rules as one JSON list, in the order they are tried.")
@timeout_option()
@click.pass_context
def policy_list(ctx: click.Context, as_json: bool, timeout: float) -> None:
    """The rules in force, in the order they are tried: name, matchers, effects, by whom, when.

    Exits 0 (a control topic that does not exist yet: no rule), 3 on bad settings, 4 when
    Kafka does not answer within --timeout.
    """
    from celery_redis_retry.control import read_policies
    from celery_redis_retry.message import dumps

    quiet_kafka_logs()
    settings = settings_of(ctx)
    records = require_kafka_answer(ctx, settings, lambda: read_policies(settings, timeout=timeout), timeout)
    ordered = ordered_records(records)
    if as_json:
        click.echo(dumps([record.document() for record in ordered]).decode())
        return
    if not ordered:
        click.echo("no retry policy rule in force: redis_retry_* settings and each op's own values decide")
    for record in ordered:
        click.echo(record_line(record))


def ordered_records(records: dict[str, Any]) -> list[Any]:
    """``records`` (name: PolicyRecord) in the order rules are tried: by order, then name."""
    return sorted(records.values(), key=lambda r: (r.rule.order, r.rule.name))


def record_line(record: Any) -> str:
    """``s (order 100): key=session:* -> max_retries=20, set by ops@host1 at 2026-12-04 20:03:15 UTC``."""
    at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.at))
    return f"{record.rule.describe()}, set by {record.by} at {at}"
