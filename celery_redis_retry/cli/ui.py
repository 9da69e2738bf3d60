"""``redis-retry ui``: serve the operator page (:mod:`celery_redis_retry.ui`) until SIGINT/SIGTERM."""

from __future__ import annotations

import click

from celery_redis_retry.cli.common import celery_app, quiet_kafka_logs, settings_of, setup_logging
from celery_redis_retry.names import EXIT_CONFIG, EXIT_USAGE


@click.command("ui")
@click.option("--bind", default="127.0.0.1", show_default=True,
              help="Address to listen on; any but loopback needs --token.")
@click.option("--port", default=8600, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option("--token", envvar="CRR_UI_TOKEN", default=None,
              help="Every request must carry it (Authorization: Bearer, or open the page once with ?token=). "
                   "Also read from CRR_UI_TOKEN.")
@click.option("--read-only", is_flag=True, help="Show figures and records; refuse replay and purge.")
@click.option("--loglevel", "-l", default="INFO", show_default=True, help="Logging level.")
@click.pass_context
def ui(  # noqa: PLR0917 - click passes every option
    ctx: click.Context, bind: str, port: int, token: str | None, read_only: bool, loglevel: str,
) -> None:
    """Serve the operator page: live figures, and the dead-letter topic with replay and purge.

    Open without a token on a loopback address only. Exits 0 on SIGINT/SIGTERM,
    2 on a non-loopback --bind without --token, 3 on bad settings or a missing
    'ui' extra.
    """
    from celery_redis_retry.errors import ConfigurationError
    from celery_redis_retry.ui.access import check_bind

    try:
        check_bind(bind, token)
    except ConfigurationError as exc:
        click.echo(f"error: {exc}", err=True)
        ctx.exit(EXIT_USAGE)
    try:
        import uvicorn

        from celery_redis_retry.ui.server import PageConfig, create_app
    except ImportError as exc:
        click.echo(f"error: the operator page needs the 'ui' extra ({exc}): pip install 'celery-redis-retry[ui]'",
                   err=True)
        ctx.exit(EXIT_CONFIG)
    from celery_redis_retry.dlq.admin import DeadLetterQueue
    from celery_redis_retry.ui.feed import Feed

    setup_logging(loglevel)
    quiet_kafka_logs()
    root = ctx.find_root()
    settings = settings_of(root)
    feed = Feed(celery_app(root), settings)
    feed.start()
    try:
        app = create_app(feed, DeadLetterQueue(settings, timeout=10.0), PageConfig(token=token, read_only=read_only))
        uvicorn.run(app, host=bind, port=port, log_level=loglevel.lower(), access_log=False)
    finally:
        feed.stop()
