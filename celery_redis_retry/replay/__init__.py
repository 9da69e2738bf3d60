"""Steps 5 to 7 of the flow, in the Celery worker: run ops on their target Redis, or dead-letter them.

- :mod:`~celery_redis_retry.replay.tasks`: the Celery tasks (``replay``, ``replay_batch``,
  ``dead_letter``) with their backoff and outcomes;
- :mod:`~celery_redis_retry.replay.executor`: running an op at most once where it matters
  (``apply_once.lua``), and never over a newer write;
- :mod:`~celery_redis_retry.replay.worker`: what ``install(app)`` adds to the app (queue,
  boot steps that refuse bad settings and serve metrics).
"""
