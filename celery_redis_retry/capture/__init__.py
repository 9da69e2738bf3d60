"""Steps 1 to 3 of the flow, in the application: capture a failed write and hand it to Kafka.

- :mod:`~celery_redis_retry.capture.wrap`: ``wrap(client)``, a redis-py client whose
  failed writes are captured without boilerplate (and stamped, so that a replay never
  overwrites a newer write);
- :mod:`~celery_redis_retry.capture.guard`: ``publish(op)`` and the ``on_failure`` guard,
  for writes described by hand with :mod:`celery_redis_retry.ops`;
- :mod:`~celery_redis_retry.capture.producer`: the per-process Kafka producer that takes
  an op in microseconds and never drops it;
- :mod:`~celery_redis_retry.capture.spool`: its local, crash-safe spool for when Kafka
  cannot take the op.
"""
