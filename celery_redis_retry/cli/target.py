"""``redis-retry target pause|resume|list``: an operator holds a target's ops, and lets them go.

The pause is a record in the compacted control topic (:mod:`celery_redis_retry.control`):
every bridge and worker follows it, and it survives their restarts. Exit codes as the
other commands: 2 a bad command line or an unknown target, 3 bad settings, 4 Kafka does
not answer (or does not confirm the record), 5 the control topic does not exist.
"""

from __future__ import annotations

import time
from typing import Any

import click

from celery_redis_retry.cli.common import (
    quiet_kafka_logs,
    require_kafka_answer,
    settings_of,
    timeout_option,
    write_control,
)


@click.group("target")
def target() -> None:
    """Pause, resume and list the targets (redis_retry_targets).

    A paused target gets no writes: the bridges keep its ops in its waiting topic, and
    workers park the ones they already hold, without spending an attempt. Resuming lets
    them flow again. The pause lives in Kafka and survives bridge and worker restarts.
    """


@target.command("pause")
@click.argument("name")
@click.option("--reason", default="", help="Why: shown by \"target list\", \"status\" and the bridges' logs.")
@timeout_option()
@click.pass_context
def target_pause(ctx: click.Context, name: str, reason: str, timeout: float) -> None:
    """Pause target NAME: its ops wait in its waiting topic until "target resume NAME".

    The pause is a record in the control topic (redis_retry_control_topic): it holds
    across bridge and worker restarts. Exits 0 once Kafka confirmed it, 2 on an unknown
    target or a bad command line, 3 on bad settings, 4 when Kafka does not answer within
    --timeout, 5 when the control topic does not exist (see: redis-retry topics create).
    """
    from celery_redis_retry import control

    pause = write_control(ctx, timeout, lambda settings: control.pause(settings, name, reason=reason, timeout=timeout))
    click.echo(f"target {name} {pause.describe()}; its ops wait in {settings_of(ctx).waiting_topic(name)}")


@target.command("resume")
@click.argument("name")
@timeout_option()
@click.pass_context
def target_resume(ctx: click.Context, name: str, timeout: float) -> None:
    """Resume target NAME: the ops that waited flow to it again, at a rate that ramps up.

    Exits 0 once Kafka confirmed it, 2 on an unknown target or a bad command line, 3 on
    bad settings, 4 when Kafka does not answer within --timeout, 5 when the control topic
    does not exist.
    """
    from celery_redis_retry import control

    pause = write_control(ctx, timeout, lambda settings: control.resume(settings, name, timeout=timeout))
    click.echo(f"target {name} {pause.describe()}")


@target.command("list")
@click.option("--json", "as_json", is_flag=True, help="The targets as one JSON object.")
@timeout_option()
@click.pass_context
def target_list(ctx: click.Context, as_json: bool, timeout: float) -> None:
    """Each target: paused or not, by whom, since when and why.

    Exits 0 (a control topic that does not exist yet: nothing is paused), 3 on bad
    settings, 4 when Kafka does not answer within --timeout.
    """
    from celery_redis_retry.control import read_pauses
    from celery_redis_retry.message import dumps

    quiet_kafka_logs()
    settings = settings_of(ctx)
    pauses = require_kafka_answer(ctx, settings, lambda: read_pauses(settings, timeout=timeout), timeout)
    if as_json:
        click.echo(dumps({name: paused_document(pauses.get(name)) for name in settings.targets}).decode())
        return
    for name in settings.targets:
        click.echo(f"{name:<16} {paused_line(pauses.get(name))}")


def paused_document(pause: Any) -> dict[str, Any]:
    """``{"paused": bool, "by", "since", "reason"}`` of one target's last control record (None: never paused)."""
    if pause is None or not pause.paused:
        return {"paused": False, "by": None, "since": None, "reason": None}
    return {"paused": True, "by": pause.by, "since": pause.at, "reason": pause.reason}


def paused_line(pause: Any) -> str:
    """``paused by ops@host1 since 2026-12-04 20:03:15 UTC (12 s ago): failover``, or ``not paused``."""
    if pause is None or not pause.paused:
        return "not paused"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(pause.at))
    why = f": {pause.reason}" if pause.reason else ""
    return f"paused by {pause.by} since {since} ({max(0.0, time.time() - pause.at):.0f} s ago){why}"
