"""A tiny Celery app for tests/test_harness.py: broker and result backend from $CRR_HARNESS_REDIS_URL."""

from __future__ import annotations

import os

from celery import Celery

app = Celery("harness_app", broker=os.environ["CRR_HARNESS_REDIS_URL"], backend=os.environ["CRR_HARNESS_REDIS_URL"])


@app.task(name="harness_app.add")
def add(x: int, y: int) -> int:
    return x + y
