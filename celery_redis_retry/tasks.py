"""The Celery tasks, by the module name an app lists in ``include``.

``include=["celery_redis_retry.tasks"]`` registers ``celery_redis_retry.replay``,
``celery_redis_retry.replay_batch`` and ``celery_redis_retry.dead_letter`` on the app,
as :func:`celery_redis_retry.install` does (which also adds the queue). The tasks live
in :mod:`celery_redis_retry.replay.tasks`.
"""

from __future__ import annotations

from celery_redis_retry.names import DEAD_LETTER_TASK, REPLAY_BATCH_TASK, REPLAY_TASK
from celery_redis_retry.replay.tasks import dead_letter, replay, replay_batch
from celery_redis_retry.replay.worker import attach

__all__ = ["DEAD_LETTER_TASK", "REPLAY_BATCH_TASK", "REPLAY_TASK", "attach", "dead_letter", "replay", "replay_batch"]
