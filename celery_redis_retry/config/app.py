"""The settings of a Celery app: read once from its ``app.conf``, cached on the app.

``settings_for(app)`` is what every role calls; it also checks what the settings
require of the Celery broker (:mod:`celery_redis_retry.config.broker`).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

from celery_redis_retry.config.broker import check_broker_visibility, warn_if_broker_is_a_target
from celery_redis_retry.config.settings import KEY_PREFIX, Settings

#: Each app's settings, read once.
_cache: weakref.WeakKeyDictionary[Any, Settings] = weakref.WeakKeyDictionary()


def settings_given(app: Any) -> bool:
    """Whether a Celery app's settings are given, loaded or not: it is configured, has a
    ``config_from_object`` source, or ``redis_retry_*`` keys set with ``app.conf.update()``."""
    return bool(getattr(app, "configured", True) or getattr(app, "_config_source", None) is not None
                or pending_settings(app) is not None)


def pending_settings(app: Any) -> Mapping[str, Any] | None:
    """What ``app.conf.update()`` set on an app not configured yet, when it holds ``redis_retry_*``
    keys (None otherwise): checking it leaves the configuration to be loaded later."""
    given = getattr(app, "_preconf", None) or {}
    if any(isinstance(key, str) and key.lower().startswith(KEY_PREFIX) for key in given):
        return dict(given)
    return None


def settings_for(app: Any) -> Settings:
    """The app's :class:`Settings`, read and validated on first use, then cached on the app."""
    settings = _cache.get(app)
    if settings is None:
        settings = Settings.from_mapping(app.conf)
        check_broker_visibility(settings, app.conf)
        warn_if_broker_is_a_target(settings, app.conf)
        _cache[app] = settings
    return settings
