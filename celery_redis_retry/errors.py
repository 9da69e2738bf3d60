"""The one exception tree of celery_redis_retry.

Every error this package raises derives from :class:`RedisRetryError`; none reuses a
builtin name (``ConnectionError`` and ``TimeoutError`` belong to Python and redis-py).
Every exception class is defined here (and stays importable from the module that
defined it before). The only one defined elsewhere is the Celery command-line form of
:class:`SettingsRefusedError`: this module imports no Kafka, Celery or click module, as
every process imports it, the application's hot path too.
Errors that end an op in the dead-letter topic carry a stable ``reason`` string: it is
what DLQ records, logs and metrics use, so it never changes once released.
"""

from __future__ import annotations

from typing import Any


class RedisRetryError(Exception):
    """Root of every error raised by celery_redis_retry."""

    reason: str = "error"


class ConfigurationError(RedisRetryError):
    """A ``redis_retry_*`` setting is missing or invalid; the message names the key."""

    reason = "configuration"


class SettingsRefusedError(ConfigurationError):
    """Bad settings at worker start: ``celery worker`` prints this one line and exits 3 (no traceback).

    What the worker raises is a subclass that is also Celery's command-line exception
    (in :mod:`celery_redis_retry.replay.worker`, which may import Celery).
    """


class TargetURLError(RedisRetryError, ValueError):
    """A target URL that no client could connect with; the message says what is wrong."""


# -- Kafka -------------------------------------------------------------------------------

#: The command that creates the topics, as :class:`TopicMissingError` suggests it.
CREATE_COMMAND = "celery -A {app} redis-retry topics create"


class KafkaCredentialsError(ConfigurationError):
    """The cluster refused this process's SASL credentials: a setting to fix, not an outage.

    The message (``celery_redis_retry.kafka.credentials_problem``) names the setting.
    """


class TopicMissingError(RedisRetryError):
    """A topic this process needs does not exist on the cluster (it does not create topics on use).

    :attr:`topic` names it, :attr:`bootstrap` the cluster, :attr:`role` what it is for
    (``retry``, ``DLQ``...); ``str()`` says how to create it.
    """

    reason = "topic_missing"

    def __init__(self, topic: str, bootstrap: str, *, role: str = "") -> None:
        self.topic = topic
        self.bootstrap = bootstrap
        self.role = role
        super().__init__(self.explain())

    def explain(self, app: str = "<app>") -> str:
        """The message, with ``app`` (the ``celery -A`` argument) in the command to run."""
        what = f"{self.role} topic" if self.role else "topic"
        return (
            f"{what} {self.topic!r} does not exist on {self.bootstrap}; "
            f"create it with: {CREATE_COMMAND.format(app=app)}"
        )


class TopicSetupError(RedisRetryError):
    """The topics cannot be created as asked (too few brokers, no controller...)."""

    reason = "topic_setup"


# -- capture and wire format -------------------------------------------------------------


class EncodeError(RedisRetryError):
    """An op cannot be built or serialized (bad argument type, unknown command...)."""

    reason = "invalid_op"


class CrossSlotError(EncodeError):
    """An op's keys live in different Redis Cluster slots and cannot run atomically."""

    reason = "cross_slot"


class DecodeError(RedisRetryError):
    """Bytes are not a valid op message; the message says what is wrong and where."""

    reason = "malformed"


class UnsupportedVersionError(DecodeError):
    """The message names a wire-format version this release cannot read."""

    reason = "unsupported_version"


class SignatureError(DecodeError):
    """The message is unsigned, signed with an unknown key, or its HMAC does not match."""

    reason = "bad_signature"


# Raised both when an op is built or published and when a message is read back.


class CommandNotAllowedError(EncodeError, DecodeError):
    """The command is not in ``redis_retry_allowed_commands`` (or not known at all)."""

    reason = "forbidden_command"


class UnknownTargetError(EncodeError, DecodeError):
    """The op names a target missing from ``redis_retry_targets``."""

    reason = "unknown_target"


class UnknownScriptError(EncodeError, DecodeError):
    """The op names a Lua script that ``redis_retry_scripts`` does not register."""

    reason = "unknown_script"


class CrossSlotMessageError(CrossSlotError, DecodeError):
    """A message read back holds an op its cluster target cannot run atomically (keys in several slots).

    What :class:`CrossSlotError` is when an op is published, once it is read from Kafka
    or a Celery task: the message is rejected, never replayed.
    """


# -- publishing --------------------------------------------------------------------------


class PublishError(RedisRetryError):
    """An op could be neither handed to Kafka nor written to the local spool."""

    reason = "publish_failed"


class CapturedWriteError(RedisRetryError):
    """A write failed and was published for replay (``wrap(..., raise_on_capture=True)``).

    ``op`` is the published op, ``op_id`` its id; ``__cause__`` is the Redis error.
    The write has *not* happened yet: it will be replayed, or end in the DLQ.
    """

    reason = "captured"

    def __init__(self, message: str, op: Any) -> None:
        super().__init__(message)
        self.op = op
        self.op_id: str = op.id


class SpoolFullError(PublishError):
    """The local spool reached ``redis_retry_spool_max_bytes``; nothing more fits."""

    reason = "spool_full"


# -- replay ------------------------------------------------------------------------------


class ReplayError(RedisRetryError):
    """Base of the reasons a replay ends an op in the dead-letter topic."""

    reason = "replay_failed"


class PermanentReplayError(ReplayError):
    """Redis refused the op in a way no retry can fix (WRONGTYPE, syntax, arity...)."""

    def __init__(self, message: str, *, reason: str = "permanent_error") -> None:
        super().__init__(message)
        self.reason = reason


class RetriesExhaustedError(ReplayError):
    """The op failed with retryable errors on every one of its attempts."""

    reason = "retries_exhausted"


# -- the bridge --------------------------------------------------------------------------


class BridgeUnavailableError(RedisRetryError):
    """Kafka or the Celery broker cannot be reached when the bridge starts."""

    reason = "unavailable"


class HandoverError(RedisRetryError):
    """Ops could be handed neither to Celery nor to the DLQ; their partitions must stop."""

    reason = "handover_failed"


# -- operators' pauses (celery_redis_retry.control) -----------------------------------------


class UnknownTargetNameError(RedisRetryError, ValueError):
    """A target name given to pause or resume is not in ``redis_retry_targets``."""

    reason = "unknown_target"


class TargetPausedError(RedisRetryError):
    """An op was parked untried: an operator paused its target (the reason its parked message carries).

    Never a dead letter's reason: a paused target's ops wait, they do not end.
    """


# -- retry policy rules (celery_redis_retry.retry_policy, celery_redis_retry.control) ---------


class PolicyRuleError(RedisRetryError, ValueError):
    """A retry policy rule that cannot be used; the message names the field."""


class UnknownPolicyError(RedisRetryError, LookupError):
    """No retry policy rule of that name is in force."""


# -- the test harness (celery_redis_retry.testing) ---------------------------------------


class HarnessError(RedisRetryError, RuntimeError):
    """A test process could not be found, started or stopped."""

    reason = "harness"


class ProcessExitedError(HarnessError):
    """A managed process exited while the harness was waiting for it; carries its log tail."""


class HarnessTimeoutError(HarnessError, TimeoutError):
    """Something the harness waited for did not happen in time."""


__all__ = [
    "BridgeUnavailableError",
    "CapturedWriteError",
    "CommandNotAllowedError",
    "ConfigurationError",
    "CrossSlotError",
    "CrossSlotMessageError",
    "DecodeError",
    "EncodeError",
    "HandoverError",
    "HarnessError",
    "HarnessTimeoutError",
    "KafkaCredentialsError",
    "PermanentReplayError",
    "PolicyRuleError",
    "ProcessExitedError",
    "PublishError",
    "RedisRetryError",
    "ReplayError",
    "RetriesExhaustedError",
    "SettingsRefusedError",
    "SignatureError",
    "SpoolFullError",
    "TargetPausedError",
    "TargetURLError",
    "TopicMissingError",
    "TopicSetupError",
    "UnknownPolicyError",
    "UnknownScriptError",
    "UnknownTargetError",
    "UnknownTargetNameError",
    "UnsupportedVersionError",
]
