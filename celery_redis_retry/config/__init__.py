"""Typed settings, read once from the ``redis_retry_*`` keys of a Celery app's config.

This package is the only code that reads the app's configuration (``app.conf``):
everything downstream takes a :class:`Settings`.

- :mod:`~celery_redis_retry.config.settings`: the :class:`Settings`, every key, its
  default, and how it is read and checked;
- :mod:`~celery_redis_retry.config.app`: ``settings_for(app)``, read once and cached;
- :mod:`~celery_redis_retry.config.broker`: what the settings require of the Celery broker.
"""

from __future__ import annotations

from celery_redis_retry.config.app import pending_settings, settings_for, settings_given
from celery_redis_retry.config.broker import (
    broker_shared_with_targets,
    celery_broker_url,
    check_broker_visibility,
    confirm_task_publishing,
    shown_broker_url,
    warn_if_broker_is_a_target,
)
from celery_redis_retry.config.settings import (
    DEFAULTS,
    KEYS,
    WITHOUT_DEFAULT,
    Settings,
    backoff_keys,
    check_key_names,
    default_spool_path,
    waiting_group,
    waiting_topic_name,
)

__all__ = [
    "DEFAULTS",
    "KEYS",
    "WITHOUT_DEFAULT",
    "Settings",
    "backoff_keys",
    "broker_shared_with_targets",
    "celery_broker_url",
    "check_broker_visibility",
    "check_key_names",
    "confirm_task_publishing",
    "default_spool_path",
    "pending_settings",
    "settings_for",
    "settings_given",
    "shown_broker_url",
    "waiting_group",
    "waiting_topic_name",
    "warn_if_broker_is_a_target",
]
