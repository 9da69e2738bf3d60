"""Names that cross a process boundary, in one place: Celery task names and exit codes.

Task names are what the bridge sends and workers register; they are part of the wire
contract between the two and never change once released. Exit codes are what the
``redis-retry`` commands and ``celery worker`` return on a refused start, for scripts
and supervisors to tell a setting to fix from an outage to wait out.
"""

from __future__ import annotations

#: The Celery tasks a worker registers (``install(app)`` or ``include``) and the bridge sends.
REPLAY_TASK = "celery_redis_retry.replay"
REPLAY_BATCH_TASK = "celery_redis_retry.replay_batch"
DEAD_LETTER_TASK = "celery_redis_retry.dead_letter"

#: ``positions`` of a ``replay_batch`` task whose ops were all read where they came from
#: (none from a waiting topic): the origins are the positions, and are not sent twice.
AT_ORIGINS = "origins"

#: Exit codes shared by every command (and ``celery worker`` refusing its settings).
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3  # a redis_retry_* setting is missing or invalid
EXIT_UNAVAILABLE = 4  # Kafka or the Celery broker cannot be reached at start
EXIT_NO_TOPIC = 5  # a Kafka topic the command needs does not exist (see ``redis-retry topics create``)
