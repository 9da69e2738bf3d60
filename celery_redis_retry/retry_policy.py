"""Retry policy by rule: which limit, backoff, deadline and priority an op gets, decided at run time.

Pure: no I/O, no state. An operator writes rules (``redis-retry policy set``) into the
control topic (:mod:`celery_redis_retry.control`); every bridge and worker follows it and
asks :meth:`PolicyRules.decide` at every attempt, so ops already in flight follow a rule
set after they were captured.

A rule matches an op by ``target``, ``command`` (any command of the op), ``key`` (a glob
on the op's first key) and ``source`` (a glob); a matcher left out matches every op.
When several rules match, the lowest ``order`` wins, ties by name. Each effect the
winning rule sets beats the op's own value (``max_retries``, ``deadline``) and the
settings (``redis_retry_max_retries``, ``redis_retry_backoff``/``_max``,
``redis_retry_max_age``); an effect it leaves unset comes from the op and the settings.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import Any

from celery_redis_retry.config import Settings
from celery_redis_retry.errors import ConfigurationError, PolicyRuleError
from celery_redis_retry.ops import RedisOp
from celery_redis_retry.policy import Backoff
from celery_redis_retry.redis_commands import COMMANDS

#: What ``priority`` may say; the bridge's lanes read it.
PRIORITIES = ("critical", "ordinary")
#: The order of a rule that does not give one.
DEFAULT_ORDER = 100
_NAME = re.compile(r"[A-Za-z0-9_.:-]+")
_MATCHERS = ("target", "command", "key", "source")
_EFFECTS = ("max_retries", "backoff", "backoff_max", "deadline", "priority")


@dataclass(frozen=True)
class PolicyRule:
    """One operator rule: matchers (None: any op) and effects (None: as without the rule)."""

    name: str
    target: str | None = None
    command: str | None = None
    key: str | None = None
    source: str | None = None
    max_retries: int | None = None
    backoff: float | None = None
    backoff_max: float | None = None
    deadline: float | None = None
    priority: str | None = None
    order: int = DEFAULT_ORDER

    def __post_init__(self) -> None:
        _check_rule(self)

    @classmethod
    def parse(cls, fields: Mapping[str, Any]) -> PolicyRule:
        """A rule from JSON-like ``fields``; :class:`PolicyRuleError` naming the field that is wrong."""
        unknown = sorted(set(fields) - {"name", "order", *_MATCHERS, *_EFFECTS})
        if unknown:
            raise PolicyRuleError(f"unknown field(s) of a retry policy rule: {', '.join(unknown)}")
        if "name" not in fields:
            raise PolicyRuleError("name: a retry policy rule needs a name")
        given = {k: v for k, v in fields.items() if v is not None}
        for name in ("name", *_MATCHERS, "priority"):
            if name in given and not isinstance(given[name], str):
                raise PolicyRuleError(f"{name}: must be a string, got {given[name]!r}")
        for name in ("max_retries", "order"):
            if name in given and (isinstance(given[name], bool) or not isinstance(given[name], int)):
                raise PolicyRuleError(f"{name}: must be a whole number, got {given[name]!r}")
        for name in ("backoff", "backoff_max", "deadline"):
            if name in given and (isinstance(given[name], bool) or not isinstance(given[name], (int, float))):
                raise PolicyRuleError(f"{name}: must be a number of seconds, got {given[name]!r}")
            if name in given:
                given[name] = float(given[name])
        return cls(**given)

    def check(self, settings: Settings, broker_conf: Mapping[str, Any] | None = None) -> None:
        """Refuse a rule these settings cannot follow: an unknown target, a backoff cap the broker re-delivers.

        ``broker_conf`` is the Celery app's configuration; given, ``backoff_max`` is held
        to the same visibility-timeout limit as ``redis_retry_backoff_max``.
        """
        if self.target is not None and self.target not in settings.targets:
            raise PolicyRuleError(f"target: unknown target {self.target!r}: redis_retry_targets names "
                                  f"{', '.join(sorted(settings.targets))}")
        if self.backoff_max is not None and broker_conf is not None:
            from celery_redis_retry.config.broker import check_backoff_cap
            try:
                check_backoff_cap(self.backoff_max, broker_conf, what="backoff_max")
            except ConfigurationError as exc:
                raise PolicyRuleError(str(exc)) from None

    def matches(self, op: RedisOp) -> bool:
        """Whether every matcher this rule gives matches ``op``."""
        if self.target is not None and op.target != self.target:
            return False
        if self.command is not None and not any(str(c[0]).upper() == self.command for c in op.commands):
            return False
        if self.source is not None and (op.source is None or not fnmatchcase(op.source, self.source)):
            return False
        return self.key is None or _key_matches(op.first_key, self.key)

    def document(self) -> dict[str, Any]:
        """The rule's fields that are set, as JSON-ready values (``name`` and ``order`` always)."""
        fields = {"name": self.name, "order": self.order}
        fields.update({k: getattr(self, k) for k in (*_MATCHERS, *_EFFECTS) if getattr(self, k) is not None})
        return fields

    def describe(self) -> str:
        """``session-keys (order 100): key=session:* -> max_retries=20 backoff=0.5``, for logs and status."""
        matchers = " ".join(f"{k}={getattr(self, k)}" for k in _MATCHERS if getattr(self, k) is not None)
        effects = " ".join(f"{k}={getattr(self, k):g}" if isinstance(getattr(self, k), float)
                           else f"{k}={getattr(self, k)}" for k in _EFFECTS if getattr(self, k) is not None)
        return f"{self.name} (order {self.order}): {matchers or 'every op'} -> {effects}"


def _key_matches(key: Any, pattern: str) -> bool:
    """Glob ``pattern`` on a key that may be bytes (not UTF-8 even), str or a number."""
    if key is None:
        return False
    if isinstance(key, bytes):
        return fnmatchcase(key, pattern.encode("utf-8", "surrogateescape"))
    return fnmatchcase(str(key), pattern)


def _check_rule(rule: PolicyRule) -> None:
    """:class:`PolicyRuleError` naming the first field of ``rule`` that is wrong."""
    if not _NAME.fullmatch(rule.name):
        raise PolicyRuleError(f"name: {rule.name!r} may only hold letters, digits and _ . : -")
    if rule.command is not None:
        object.__setattr__(rule, "command", rule.command.upper())  # frozen: set once, while being built
        if rule.command not in COMMANDS:
            raise PolicyRuleError(f"command: {rule.command!r} is not a Redis write command "
                                  "celery_redis_retry replays")
    for name in ("target", "key", "source"):
        _check_glob(name, getattr(rule, name))
    for name in ("max_retries", "backoff", "backoff_max", "deadline"):
        value = getattr(rule, name)
        if value is not None and value < 0:
            raise PolicyRuleError(f"{name}: must not be negative, got {value:g}")
    if rule.backoff == 0:
        raise PolicyRuleError("backoff: must be a positive number of seconds, got 0")
    if rule.priority is not None and rule.priority not in PRIORITIES:
        raise PolicyRuleError(f"priority: {rule.priority!r} is not one of {', '.join(PRIORITIES)}")
    if all(getattr(rule, name) is None for name in _EFFECTS):
        raise PolicyRuleError(f"rule {rule.name!r} has no effect: give one of {', '.join(_EFFECTS)}")


def _check_glob(name: str, value: str | None) -> None:
    if value is None:
        return
    if not value:
        raise PolicyRuleError(f"{name}: an empty pattern matches nothing; leave {name} out to match every op")
    if value.count("[") > value.count("]"):
        raise PolicyRuleError(f"{name}: {value!r} opens a [ set it does not close")


@dataclass(frozen=True)
class PolicyRecord:
    """A rule as the control topic holds it: who set it (user@host) and when (UNIX time)."""

    rule: PolicyRule
    by: str
    at: float

    def document(self) -> dict[str, Any]:
        """The record's JSON-ready fields: the rule's, ``by`` and ``at``."""
        return {**self.rule.document(), "by": self.by, "at": self.at}

    def encode(self) -> bytes:
        """The control record's value."""
        return json.dumps(self.document(), sort_keys=True).encode()

    @classmethod
    def decode(cls, value: bytes) -> PolicyRecord:
        """The record a control record's value holds; :class:`PolicyRuleError` when it holds no valid rule."""
        try:
            fields = json.loads(value)
        except ValueError as exc:
            raise PolicyRuleError(f"not JSON: {exc}") from None
        if not isinstance(fields, dict):
            raise PolicyRuleError("not a JSON object")
        by, at = fields.pop("by", ""), fields.pop("at", 0.0)
        return cls(PolicyRule.parse(fields), str(by), float(at))


@dataclass(frozen=True)
class Decision:
    """What an op gets now: its retry limit, backoff, deadline (absolute) and priority; which rule said so."""

    max_retries: int
    backoff: Backoff
    #: Absolute UNIX time the rule's deadline falls at; None: no rule deadline (the op's and the settings' count).
    deadline: float | None = None
    priority: str | None = None
    rule: str | None = None

    def countdown(self, attempt: int, rand: Callable[[], float] | None = None) -> float:
        """Seconds to wait before the retry after ``attempt`` failed attempts."""
        return self.backoff.countdown(attempt) if rand is None else self.backoff.countdown(attempt, rand)


@dataclass(frozen=True)
class PolicyRules:
    """The rules in force, in the order they are tried, and the settings' defaults."""

    rules: tuple[PolicyRule, ...] = ()
    max_retries: int = 3
    backoff: Backoff = field(default_factory=Backoff)

    @classmethod
    def of(cls, rules: Iterable[PolicyRule], settings: Settings) -> PolicyRules:
        """``rules`` over ``settings``' ``redis_retry_max_retries`` and backoff."""
        ordered = tuple(sorted(rules, key=lambda r: (r.order, r.name)))
        return cls(ordered, settings.max_retries, settings.backoff)

    def winner(self, op: RedisOp) -> PolicyRule | None:
        """The rule that decides for ``op``: the first match by (order, name); None if none matches."""
        return next((rule for rule in self.rules if rule.matches(op)), None)

    def decide(self, op: RedisOp) -> Decision:
        """What ``op`` gets now (see the module's docstring for the precedence)."""
        default_limit = self.max_retries if op.max_retries is None else op.max_retries
        rule = self.winner(op)
        if rule is None:
            return Decision(default_limit, self.backoff)
        backoff = self.backoff
        if rule.backoff is not None or rule.backoff_max is not None:
            backoff = replace(backoff, factor=rule.backoff if rule.backoff is not None else backoff.factor,
                              maximum=rule.backoff_max if rule.backoff_max is not None else backoff.maximum)
        return Decision(
            default_limit if rule.max_retries is None else rule.max_retries,
            backoff,
            None if rule.deadline is None else op.created_at + rule.deadline,
            rule.priority,
            rule.name,
        )
