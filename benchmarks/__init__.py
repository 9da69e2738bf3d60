"""Benchmarks of celery_redis_retry against the libraries it wraps (``make bench``; never part of ``make test``)."""
