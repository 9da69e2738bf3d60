"""The command line: ``celery -A proj redis-retry ...`` and the standalone ``celery-redis-retry``.

:mod:`~celery_redis_retry.cli.commands` holds the commands; :mod:`~celery_redis_retry.cli.status`
gathers what ``redis-retry status`` shows.
"""

from __future__ import annotations

from celery_redis_retry.cli.commands import main, redis_retry

__all__ = ["main", "redis_retry"]
