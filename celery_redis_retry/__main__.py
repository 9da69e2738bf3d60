"""``python -m celery_redis_retry`` runs the ``celery-redis-retry`` command."""

from celery_redis_retry.cli import main

main()
