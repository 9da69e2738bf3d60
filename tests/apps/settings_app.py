"""A Celery app whose ``redis_retry_*`` settings come from the environment, for the start-up refusal tests.

CRR_SETTINGS  JSON object of app.conf keys (``redis_retry_*`` and any other)

The Celery broker is ``memory://``: a worker that passes the settings check starts
without any server.
"""

from __future__ import annotations

import json
import os

from celery import Celery

import celery_redis_retry

app = Celery("settings_app", broker="memory://")
app.conf.update(broker_connection_retry_on_startup=True, **json.loads(os.environ.get("CRR_SETTINGS", "{}")))
celery_redis_retry.install(app)
