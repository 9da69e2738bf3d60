"""The one branch of the flow: ops that cannot be applied go to the dead-letter topic.

- :mod:`~celery_redis_retry.dlq.record`: the DLQ record (its reasons, its JSON) and the
  writer the bridge and the workers share;
- :mod:`~celery_redis_retry.dlq.admin`: what ``redis-retry dlq list|show|replay|purge``
  does with the topic, without ever deleting a record;
- :mod:`~celery_redis_retry.dlq.filters`: which records an operator selects (``DlqFilter``);
- :mod:`~celery_redis_retry.dlq.preview`: what replaying records would do now on their
  targets, read without writing (``dlq replay --dry-run``).
"""

from __future__ import annotations

from celery_redis_retry.dlq.record import DeadLetter, decode_record

__all__ = ["DeadLetter", "decode_record"]
