"""``python -m celery_redis_retry`` runs the ``celery-redis-retry`` command."""

from .cli import main

main()
