"""Step 4 of the flow: the bridge, a Kafka consumer group member that feeds Celery.

- :mod:`~celery_redis_retry.bridge.loop`: the loop itself (read, check, hand over, commit);
- :mod:`~celery_redis_retry.bridge.dispatch`: ops grouped into Celery tasks and sent;
- :mod:`~celery_redis_retry.bridge.offsets`: which offsets are safe to commit, which ops
  in flight are overdue;
- :mod:`~celery_redis_retry.bridge.circuits`: per-target circuits (an outage is not an
  op's fault) and :mod:`~celery_redis_retry.bridge.waiting`, the topics where a down
  target's ops wait;
- :mod:`~celery_redis_retry.bridge.ends`: workers tell the bridges which ops ended, so
  that Kafka holds each op until then.

Nothing here imports the worker side (:mod:`celery_redis_retry.replay`); the workers
use ``circuits``, ``waiting`` and ``ends`` too.
"""
