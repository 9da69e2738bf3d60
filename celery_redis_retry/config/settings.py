"""The :class:`Settings`: every ``redis_retry_*`` key, its default, and how it is read and checked.

Every key is validated here, and a missing or bad one raises
:class:`~celery_redis_retry.errors.ConfigurationError` naming the key (a misspelled
one names the key meant), so a worker, a bridge or a web process fails at startup
rather than at 3 a.m. on the first outage.

Kept whole: each field, its default and the reader of its key are read side by side;
the defaults are written once, as the fields' (``DEFAULTS`` is derived from them).
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from types import MappingProxyType
from typing import Any

from celery_redis_retry.errors import (
    CommandNotAllowedError,
    ConfigurationError,
    TargetURLError,
    UnknownScriptError,
    UnknownTargetError,
)
from celery_redis_retry.logs import check_format
from celery_redis_retry.message import Signer
from celery_redis_retry.ops import RedisOp
from celery_redis_retry.policy import Backoff
from celery_redis_retry.redis_commands import COMMANDS, DEFAULT_ALLOWED
from celery_redis_retry.slots import check_single_slot
from celery_redis_retry.targets import is_cluster_url, parse_target_url, redacted

logger = logging.getLogger(__name__)

#: Every setting of this package starts with it.
KEY_PREFIX = "redis_retry_"
#: Field metadata: the key's default, as written in the app's config, is None (and the
#: field's default is what None means: the built-in command list, a path from the topic).
_NONE_IN_CONFIG: Mapping[str, Any] = MappingProxyType({"key_default": None})


def waiting_topic_name(topic: str, target: str) -> str:
    """``<redis_retry_topic>.waiting.<target>``: where a target's ops wait while it is down."""
    return f"{topic}.waiting.{target}"


def waiting_group(group: str) -> str:
    """The consumer group in which the bridges of ``group`` read the waiting topics."""
    return f"{group}.waiting"


@dataclass(frozen=True)
class Settings:
    """Every ``redis_retry_*`` setting, validated. Build with :meth:`from_mapping` or :func:`settings_for`.

    The field defaults are the settings' defaults: :data:`DEFAULTS` (the keys' defaults,
    as written in an app's config) is derived from them, and the backoff's from
    :class:`~celery_redis_retry.policy.Backoff`'s.
    """

    kafka: Mapping[str, Any]
    targets: Mapping[str, str]
    topic: str = "redis-retry-queue"
    #: "" (not given): ``<topic>.dlq``.
    dlq_topic: str = ""
    #: Where workers report the ops they ended, for the bridges (see :mod:`celery_redis_retry.bridge.ends`).
    #: "" (not given): ``<topic>.ends``.
    ends_topic: str = ""
    #: Where operators pause and resume targets (see :mod:`celery_redis_retry.control`), compacted.
    #: "" (not given): ``<topic>.control``.
    control_topic: str = ""
    consumer_group: str = "redis-retry-consumer-group"
    queue: str = "redis-retry"
    #: The Celery queue of critical ops' replay tasks, consumed ahead of ``queue``.
    #: "" (not given): ``<queue>.critical``.
    critical_queue: str = ""
    max_retries: int = 3
    backoff: Backoff = field(default_factory=Backoff)
    scripts: Mapping[str, str] = field(default_factory=dict)
    signing_keys: Mapping[str, bytes] = field(default_factory=dict)
    allowed_commands: frozenset[str] = field(default=DEFAULT_ALLOWED, metadata=_NONE_IN_CONFIG)
    #: "" in a Settings built by hand: no spool path of its own; :meth:`from_mapping` puts
    #: the default one (:func:`default_spool_path`) when the key is not set.
    spool_path: str = field(default="", metadata=_NONE_IN_CONFIG)
    spool_max_bytes: int = 1 << 30
    durable_publish: bool = False
    max_message_bytes: int = 1_000_000
    dedupe_ttl: int = 7 * 24 * 3600
    #: Stamp each wrapped write and check replays against the stamps, so that a replay
    #: never overwrites a newer write (see :mod:`celery_redis_retry.stamps`).
    write_stamps: bool = True
    batch_size: int = 1000
    batch_linger_ms: int = 5
    queue_high_water: int = 500
    #: Seconds after capture at which an op without an earlier deadline ends ``expired``
    #: (0: never). Keep it below the topics' ``retention.ms``.
    max_age: int = 24 * 3600
    #: Countdown (retry) tasks one worker may hold; becomes ``worker_eta_task_limit``.
    max_countdown_tasks: int = 1000
    #: Ops per second handed over for a target whose circuit just closed; doubles every second.
    recovery_rate: int = 2000
    #: ``"end"``: the bridge commits an offset once every op before it has ended (applied,
    #: superseded, expired, dead or rejected), so Kafka holds each op until then;
    #: ``"handover"``: once Celery accepted the task (the Celery broker then holds the only copy).
    commit_after: str = "end"
    #: Seconds an op handed to Celery may go without ending (or a worker saying it retries)
    #: before the bridge hands it over again.
    redelivery_timeout: float = 300.0
    #: Ops one bridge may have handed over and not seen end; reading pauses at this many.
    max_in_flight: int = 100_000
    #: Ports on which the bridge and the worker serve Prometheus metrics (None: off).
    bridge_metrics_port: int | None = None
    bridge_health_port: int | None = None
    #: "text" (for people) or "json" (one object per line; see celery_redis_retry.logs).
    log_format: str = "text"
    worker_metrics_port: int | None = None

    def __post_init__(self) -> None:
        # The topics derived from ``topic`` unless given (frozen: set once, here).
        if not self.dlq_topic:
            object.__setattr__(self, "dlq_topic", f"{self.topic}.dlq")
        if not self.ends_topic:
            object.__setattr__(self, "ends_topic", f"{self.topic}.ends")
        if not self.control_topic:
            object.__setattr__(self, "control_topic", f"{self.topic}.control")
        if not self.critical_queue:
            object.__setattr__(self, "critical_queue", f"{self.queue}.critical")

    def check_op(self, op: RedisOp) -> None:
        """Refuse an op these settings would never replay: unknown target, command not allowed."""
        if op.target not in self.targets:
            raise UnknownTargetError(
                f"op {op.id} names target {op.target!r}, not in redis_retry_targets ({', '.join(self.targets)})"
            )
        allowed = self.allowed_commands
        if allowed is not DEFAULT_ALLOWED:  # the builders and the decoder refuse the rest already
            for command in op.commands:
                if command[0] not in allowed:
                    raise CommandNotAllowedError(f"op {op.id}: {command[0]!s} is not in redis_retry_allowed_commands")
        if op.script is not None and op.script not in self.scripts:
            raise UnknownScriptError(f"op {op.id}: script {op.script!r} is not registered in redis_retry_scripts")
        if op.target in self.cluster_targets:
            check_single_slot(op)

    @functools.cached_property
    def cluster_targets(self) -> frozenset[str]:
        """Names of the targets that are Redis Clusters (``redis+cluster://``...)."""
        return frozenset(n for n, url in self.targets.items() if is_cluster_url(url))

    def waiting_topic(self, target: str) -> str:
        """The Kafka topic where ``target``'s ops wait while its circuit is open."""
        return waiting_topic_name(self.topic, target)

    @functools.cached_property
    def waiting_topics(self) -> Mapping[str, str]:
        """Target name -> its waiting topic."""
        return MappingProxyType({target: self.waiting_topic(target) for target in self.targets})

    @functools.cached_property
    def _targets_by_waiting_topic(self) -> Mapping[str, str]:
        return MappingProxyType({topic: target for target, topic in self.waiting_topics.items()})

    def target_of_waiting_topic(self, topic: str) -> str | None:
        """The target whose waiting topic ``topic`` is, or None for any other topic."""
        return self._targets_by_waiting_topic.get(topic)

    def marker_ttl_ms(self, retries: int) -> int:
        """How long a dedupe marker lives: the dedupe TTL, and never less than the retry window plus an hour."""
        window = self.backoff.total(retries) + 3600
        return int(max(self.dedupe_ttl, window) * 1000)

    @property
    def signer(self) -> Signer | None:
        """The message signer, or None when ``redis_retry_signing_keys`` is empty."""
        return Signer(self.signing_keys) if self.signing_keys else None

    @classmethod
    def from_mapping(cls, conf: Mapping[str, Any]) -> Settings:
        """Settings from a mapping of ``redis_retry_*`` keys (a Celery ``app.conf`` works).

        A key that looks like one of ours but is not read (misspelled, upper case) is
        refused, naming the key meant.
        """
        check_key_names(conf)
        return _read(_Reader(conf))


def _field_default(spec: Field[Any]) -> Any:
    return spec.default_factory() if spec.default_factory is not MISSING else spec.default


def backoff_keys(backoff: Backoff) -> dict[str, Any]:
    """The ``redis_retry_backoff``/``_backoff_max``/``_jitter`` values that give ``backoff``."""
    factor: float | bool = backoff.factor if backoff.factor is not None else False
    if factor == _BACKOFF_TRUE_FACTOR:
        factor = True
    return {"redis_retry_backoff": factor, "redis_retry_backoff_max": backoff.maximum,
            "redis_retry_jitter": backoff.jitter}


def _key_defaults() -> dict[str, Any]:
    """Each key's default as written in an app's config, from the :class:`Settings` field defaults."""
    defaults: dict[str, Any] = {}
    for spec in fields(Settings):
        key = KEY_PREFIX + spec.name
        if key in WITHOUT_DEFAULT:
            continue
        default = _field_default(spec)
        if isinstance(default, Backoff):
            defaults.update(backoff_keys(default))
        else:
            defaults[key] = spec.metadata.get("key_default", default)
    return defaults


#: ``redis_retry_backoff = True`` means this factor, as Celery's ``retry_backoff = True`` does.
_BACKOFF_TRUE_FACTOR = 1.0
#: The keys without a default of their own: required, or derived from ``redis_retry_topic``.
WITHOUT_DEFAULT = ("redis_retry_kafka", "redis_retry_targets", "redis_retry_dlq_topic", "redis_retry_ends_topic",
                   "redis_retry_control_topic", "redis_retry_critical_queue")
#: Each key's default, as written in an app's config (None: derived, see the table in docs/configuration.md).
DEFAULTS: Mapping[str, Any] = MappingProxyType(_key_defaults())
#: Every key read here; any other ``redis_retry_*`` key is a mistake and refused.
KEYS = frozenset(DEFAULTS) | frozenset(WITHOUT_DEFAULT)


def check_key_names(conf: Mapping[str, Any]) -> None:
    """Refuse ``redis_retry_*`` keys that no code reads: a misspelling, or upper case.

    With a Celery namespace (``config_from_object(..., namespace="CELERY")``) the
    namespaced names Celery maps to our keys (``CELERY_REDIS_RETRY_KAFKA``) are read too.
    Celery's own settings that share the prefix (``redis_retry_on_timeout``) are left alone.
    """
    from celery.app.defaults import DEFAULTS as CELERY_SETTINGS

    finalize = getattr(conf, "finalize", None)
    if callable(finalize):
        finalize()  # a Celery app's pending configuration is loaded on first access
    to_keys = getattr(conf, "_to_keys", None)  # Celery's lookup: the namespaced and old names of a key
    read = {name for key in KEYS for name in (to_keys(key) if callable(to_keys) else (key,))}
    namespace = str(getattr(conf, "prefix", None) or "")
    for key in list(conf):
        if not isinstance(key, str) or key in read:
            continue
        name = key[len(namespace):] if namespace and key.upper().startswith(namespace.upper()) else key
        lower = name.lower()
        if not lower.startswith(KEY_PREFIX) or lower in CELERY_SETTINGS:
            continue
        if lower in KEYS:
            raise ConfigurationError(f"{key} is not read: the settings are lowercase, write {lower}")
        close = difflib.get_close_matches(lower, sorted(KEYS), n=1)
        hint = f"did you mean {close[0]}?" if close else "see docs/configuration.md for the keys"
        case = "" if name == lower else " (and the settings are lowercase)"
        raise ConfigurationError(f"{key} is not a celery_redis_retry setting{case}: {hint}")


class _Reader:
    """Reads one key at a time and names it in every error."""

    def __init__(self, conf: Mapping[str, Any]) -> None:
        self.conf = conf

    def get(self, key: str, default: Any = None) -> Any:
        assert key in KEYS, f"{key} is read but missing from DEFAULTS and WITHOUT_DEFAULT"
        value = self.conf.get(key)
        if value is None:
            return DEFAULTS.get(key) if default is None else default
        return value

    def required(self, key: str) -> Any:
        assert key in KEYS, f"{key} is read but missing from WITHOUT_DEFAULT"
        value = self.conf.get(key)
        if value is None:
            raise ConfigurationError(f"{key} is required")
        return value

    def string(self, key: str, default: str | None = None) -> str:
        value = self.get(key, default)
        if not isinstance(value, str) or not value:
            raise ConfigurationError(f"{key} must be a non-empty string, got {value!r}")
        return value

    def integer(self, key: str, minimum: int) -> int:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigurationError(f"{key} must be an integer >= {minimum}, got {value!r}")
        return value

    def number(self, key: str) -> float:
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigurationError(f"{key} must be a positive number of seconds, got {value!r}")
        return float(value)

    def boolean(self, key: str) -> bool:
        value = self.get(key)
        if not isinstance(value, bool):
            raise ConfigurationError(f"{key} must be True or False, got {value!r}")
        return value

    def mapping(self, key: str, required: bool = False) -> dict[str, Any]:
        value = self.required(key) if required else self.get(key)
        if not isinstance(value, Mapping):
            raise ConfigurationError(f"{key} must be a dict, got {type(value).__name__}")
        for name in value:
            if not isinstance(name, str) or not name:
                raise ConfigurationError(f"{key} keys must be non-empty strings, got {name!r}")
        return dict(value)


def _kafka(reader: _Reader) -> dict[str, Any]:
    kafka = reader.mapping("redis_retry_kafka", required=True)
    if not kafka.get("bootstrap.servers"):
        raise ConfigurationError("redis_retry_kafka must set 'bootstrap.servers' (e.g. 'kafka1:9092,kafka2:9092')")
    from celery_redis_retry.kafka import check_client_settings

    check_client_settings(kafka)
    return kafka


_TARGET_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")


def _targets(reader: _Reader) -> dict[str, str]:
    targets = reader.mapping("redis_retry_targets", required=True)
    if "default" not in targets:
        raise ConfigurationError("redis_retry_targets must name a 'default' target")
    for name, url in targets.items():
        if not _TARGET_NAME.fullmatch(name):
            # The name is part of a Kafka topic name (its waiting topic).
            raise ConfigurationError(
                f"redis_retry_targets name {name!r} must be 1-100 letters, digits, '.', '_' or '-'"
            )
        try:
            parse_target_url(url)  # as the replay connection will: refused now, not at every replay
        except TargetURLError as exc:
            raise ConfigurationError(f"redis_retry_targets[{name!r}] {exc}, got {redacted(url)!r}") from None
    return targets


def _backoff(reader: _Reader) -> Backoff:
    factor = reader.get("redis_retry_backoff")
    if factor is True:
        factor = _BACKOFF_TRUE_FACTOR
    elif factor is False:
        factor = None
    elif isinstance(factor, (int, float)) and factor > 0:
        factor = float(factor)
    else:
        raise ConfigurationError(
            f"redis_retry_backoff must be True, False or a positive number of seconds, got {factor!r}"
        )
    return Backoff(factor, reader.number("redis_retry_backoff_max"), reader.boolean("redis_retry_jitter"))


def _scripts(reader: _Reader) -> dict[str, str]:
    scripts = reader.mapping("redis_retry_scripts")
    for name, source in scripts.items():
        if not isinstance(source, str) or not source.strip():
            raise ConfigurationError(f"redis_retry_scripts[{name!r}] must be Lua source text")
    return scripts


def _signing_keys(reader: _Reader) -> dict[str, bytes]:
    keys = reader.mapping("redis_retry_signing_keys")
    out: dict[str, bytes] = {}
    for key_id, secret in keys.items():
        secret_bytes = secret.encode() if isinstance(secret, str) else secret
        if not isinstance(secret_bytes, bytes) or len(secret_bytes) < 16:
            raise ConfigurationError(f"redis_retry_signing_keys[{key_id!r}] must be a secret of at least 16 bytes")
        out[key_id] = secret_bytes
    try:
        Signer(out) if out else None
    except ValueError as exc:
        raise ConfigurationError(f"redis_retry_signing_keys: {exc}") from None
    return out


def _allowed_commands(reader: _Reader) -> frozenset[str]:
    names = reader.get("redis_retry_allowed_commands")
    if names is None:
        return DEFAULT_ALLOWED
    if isinstance(names, (str, Mapping)) or not isinstance(names, Iterable):
        raise ConfigurationError("redis_retry_allowed_commands must be a list of command names")
    names = list(names)  # a generator would be empty by the time the frozenset is built
    if not all(isinstance(n, str) for n in names):
        raise ConfigurationError("redis_retry_allowed_commands must be a list of command names")
    unknown = sorted(n for n in names if n.upper() not in COMMANDS)
    if unknown:
        raise ConfigurationError(
            f"redis_retry_allowed_commands names commands that cannot be replayed: {', '.join(unknown)} "
            "(only the write commands of celery_redis_retry.redis_commands.COMMANDS)"
        )
    return frozenset(n.upper() for n in names)


def default_spool_path(topic: str) -> str:
    """Where the spool lives unless ``redis_retry_spool_path`` says otherwise."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "celery-redis-retry", f"{topic}.spool.sqlite3")


def _read(reader: _Reader) -> Settings:
    topic = reader.string("redis_retry_topic")
    backoff = _backoff(reader)
    return Settings(
        kafka=MappingProxyType(_kafka(reader)),
        targets=MappingProxyType(_targets(reader)),
        topic=topic,
        dlq_topic=_derived_string(reader, "redis_retry_dlq_topic"),
        ends_topic=_derived_string(reader, "redis_retry_ends_topic"),
        control_topic=_derived_string(reader, "redis_retry_control_topic"),
        consumer_group=reader.string("redis_retry_consumer_group"),
        queue=reader.string("redis_retry_queue"),
        critical_queue=_critical_queue(reader),
        max_retries=reader.integer("redis_retry_max_retries", 0),
        backoff=backoff,
        scripts=MappingProxyType(_scripts(reader)),
        signing_keys=MappingProxyType(_signing_keys(reader)),
        allowed_commands=_allowed_commands(reader),
        spool_path=reader.string("redis_retry_spool_path", default=default_spool_path(topic)),
        spool_max_bytes=reader.integer("redis_retry_spool_max_bytes", 1 << 16),
        durable_publish=reader.boolean("redis_retry_durable_publish"),
        max_message_bytes=reader.integer("redis_retry_max_message_bytes", 1024),
        dedupe_ttl=reader.integer("redis_retry_dedupe_ttl", 60),
        write_stamps=reader.boolean("redis_retry_write_stamps"),
        batch_size=reader.integer("redis_retry_batch_size", 1),
        batch_linger_ms=reader.integer("redis_retry_batch_linger_ms", 0),
        queue_high_water=reader.integer("redis_retry_queue_high_water", 0),
        max_age=reader.integer("redis_retry_max_age", 0),
        max_countdown_tasks=reader.integer("redis_retry_max_countdown_tasks", 1),
        recovery_rate=reader.integer("redis_retry_recovery_rate", 1),
        commit_after=_commit_after(reader),
        redelivery_timeout=reader.number("redis_retry_redelivery_timeout"),
        max_in_flight=reader.integer("redis_retry_max_in_flight", 1),
        bridge_metrics_port=_port(reader, "redis_retry_bridge_metrics_port"),
        bridge_health_port=_port(reader, "redis_retry_bridge_health_port"),
        log_format=check_format(reader.string("redis_retry_log_format", "text"), "redis_retry_log_format"),
        worker_metrics_port=_port(reader, "redis_retry_worker_metrics_port"),
    )


def _derived_string(reader: _Reader, key: str) -> str:
    """A name given as a non-empty string, or "" when not set (Settings derives it from the topic)."""
    return "" if reader.get(key) is None else reader.string(key)


def _critical_queue(reader: _Reader) -> str:
    """``redis_retry_critical_queue`` as given ("" when not set), never the replay queue itself."""
    queue = _derived_string(reader, "redis_retry_critical_queue")
    if queue and queue == reader.string("redis_retry_queue"):
        raise ConfigurationError(
            f"redis_retry_critical_queue must differ from redis_retry_queue (both are {queue!r}): "
            "critical ops need a queue of their own to go ahead of the others"
        )
    return queue


def _commit_after(reader: _Reader) -> str:
    value = reader.get("redis_retry_commit_after")
    if value not in ("end", "handover"):
        raise ConfigurationError(f"redis_retry_commit_after must be 'end' or 'handover', got {value!r}")
    return str(value)


def _port(reader: _Reader, key: str) -> int | None:
    if reader.get(key) is None:
        return None
    port = reader.integer(key, 1)
    if port > 65535:
        raise ConfigurationError(f"{key} must be a TCP port (1-65535), got {port}")
    return port
























