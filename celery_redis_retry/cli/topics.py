"""``redis-retry topics create|describe``: the topics a deployment needs, made as production needs them.

The plans come from :mod:`celery_redis_retry.kafka.topics`; this module asks the cluster
and prints what it found, what it created and what differs.
"""

from __future__ import annotations

from typing import Any

import click

from celery_redis_retry.cli.common import app_name, quiet_kafka_logs, require_kafka_answer, settings_of, timeout_option
from celery_redis_retry.names import EXIT_FAILURE, EXIT_NO_TOPIC, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE


@click.group("topics")
def topics() -> None:
    """Create and describe the topics: retry, DLQ, ends, control and waiting (for clusters that do not auto-create).

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
    timeout_option(30.0),
]


def _plan_options(command: Any) -> Any:
    for decorator in reversed(_PLAN_OPTIONS):
        command = decorator(command)
    return command


def _plans(ctx: click.Context, options: dict[str, Any]) -> Any:
    from celery_redis_retry.errors import RedisRetryError
    from celery_redis_retry.kafka import topics as topic_admin

    settings = settings_of(ctx)
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
    from celery_redis_retry.errors import TopicSetupError
    from celery_redis_retry.kafka import KafkaException

    try:
        return require_kafka_answer(ctx, settings, call, timeout)
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

    quiet_kafka_logs()
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

    quiet_kafka_logs()
    settings, plans = _plans(ctx, options)
    timeout = options["timeout"]
    states = _ask_cluster(ctx, settings, lambda: describe(settings, plans, timeout=timeout), timeout)
    _echo_states(states)
    if any(s.action == "missing" for s in states):
        click.echo(f"create them with: celery -A {app_name(ctx)} redis-retry topics create", err=True)
        ctx.exit(EXIT_NO_TOPIC)


topics.add_command(topics_describe, "check")
