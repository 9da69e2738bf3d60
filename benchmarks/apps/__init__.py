"""Celery apps the benchmarks run in real ``celery worker`` and ``celery redis-retry bridge`` processes."""
