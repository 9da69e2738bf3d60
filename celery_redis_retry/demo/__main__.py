"""``python -m celery_redis_retry.demo``: see :mod:`celery_redis_retry.demo.run`."""

import sys

from celery_redis_retry.demo.run import main

sys.exit(main())
