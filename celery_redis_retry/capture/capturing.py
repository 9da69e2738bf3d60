"""What a wrapped client and its pipelines share: which failed writes become ops, and how they are published.

:class:`Capture` builds the op of a failed command, script call or pipeline (or says
it cannot be captured), prepares each write to go out stamped through
``write_stamped.lua`` (:mod:`celery_redis_retry.capture.stamped`), publishes captured
ops with the producer and tells an outage of a target in a few lines
(:data:`WRITE_OUTAGES`). :mod:`celery_redis_retry.capture.wrap` plugs it into redis-py.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from redis.commands import READ_COMMANDS
from redis.commands.core import Script

from celery_redis_retry import ops, stamps
from celery_redis_retry.capture.producer import RetryProducer
from celery_redis_retry.capture.stamped import StampedStack, StampedWrite
from celery_redis_retry.config import Settings
from celery_redis_retry.errors import CapturedWriteError, ConfigurationError, EncodeError, RedisRetryError
from celery_redis_retry.ops import Priority, RedisOp
from celery_redis_retry.outage_log import Outages
from celery_redis_retry.redis_commands import COMMANDS, LUA_MAX_ARGS, is_idempotent
from celery_redis_retry.slots import marker_for
from celery_redis_retry.stamps import WRITE_STAMPED
from celery_redis_retry.targets import TargetAddress, client_address, parse_target_url, redacted

logger = logging.getLogger(__name__)


#: The targets whose writes fail now, for the whole process: an outage is one line when it
#: starts, a count at most once a minute, and one line when a write goes through again.
WRITE_OUTAGES = Outages()


#: Table writes that are never captured automatically: the reply is the result the
#: caller wanted (a popped element, the old value), and a replay would discard it.
REPLY_CONSUMING = frozenset(
    ("GETSET", "GETDEL", "SPOP", "LPOP", "RPOP", "ZPOPMIN", "ZPOPMAX", "LMOVE", "RPOPLPUSH")
)


#: Commands a pipeline may hold besides writes without preventing its capture.
_HARMLESS = frozenset(READ_COMMANDS) | {"PING", "ECHO", "TIME", "MULTI", "EXEC"}


# What writes use before the producer's own settings can be read.
_DEFAULT_SETTINGS = Settings(kafka={}, targets={})


# Markers of confirmed writes are unlinked this many at a time, or at least this often.
_FORGET_BATCH = 256


_FORGET_EVERY_S = 1.0


# Frames of these packages are skipped when naming the caller as the op's source.
_OWN_PACKAGES = ("redis", "celery_redis_retry")


def _command_name(args: tuple[Any, ...]) -> str:
    name = args[0]
    return (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).upper()


def op_summary(op: RedisOp) -> str:
    """``SET user:42``, ``pipeline of 3 (MULTI/EXEC)``, ``script bump``: for logs and messages."""
    if op.kind == "script":
        return f"script {op.script}"
    if op.kind == "pipeline":
        return f"pipeline of {len(op.commands)}" + (" (MULTI/EXEC)" if op.transaction else "")
    key = op.first_key
    return f"{op.commands[0][0]!s} {key!r:.60}" if isinstance(key, bytes) else f"{op.commands[0][0]!s} {key!s:.60}"


class Capture:
    """What a wrapped client and its pipelines share: where and how ops are published."""

    def __init__(
        self,
        producer: RetryProducer | None,
        source: str | None,
        target: str,
        raise_on_capture: bool,
        on_capture: Callable[[RedisOp], None] | None,
        *,
        priority: Priority | None = None,
    ) -> None:
        self._producer = producer
        self.priority = priority
        self.source = source
        self.target = target
        self.raise_on_capture = raise_on_capture
        self.on_capture = on_capture
        self._scripts: dict[str, str] | None = None
        self._lock = threading.Lock()
        self._settings: Settings | None = None
        self._confirmed: list[bytes] = []
        self._apply_script: Script | None = None
        self._forgotten_at = 0.0
        self.stamp_ttl = self.marker_ttl = 0
        self.server: TargetAddress | None = None

    @property
    def producer(self) -> RetryProducer:
        if self._producer is not None:
            return self._producer
        from celery_redis_retry.capture.guard import default_producer

        return default_producer()  # looked up each time: install() may come after wrap()

    def check_server(self, client: Any) -> None:
        """Refuse ``client`` unless it talks to its target's server: now when the settings
        can be read, else at the first write (``install()`` may come after ``wrap()``)."""
        self.server = client_address(client)
        from celery_redis_retry.capture.guard import default_settings

        try:
            settings = self._producer.settings if self._producer is not None else default_settings()
        except ConfigurationError:
            return
        self.check_target(settings)

    def check_target(self, settings: Settings) -> None:
        """Raise :class:`ConfigurationError` if the target is unknown or names another server than the client's.

        Hosts are compared as written (``localhost`` and ``127.0.0.1`` are one); no DNS
        name is resolved.
        """
        url = settings.targets.get(self.target)
        if url is None:
            raise ConfigurationError(
                f"wrap(target={self.target!r}): no such target in redis_retry_targets ({', '.join(settings.targets)})"
            )
        target = parse_target_url(url)
        if self.server is not None and target.mismatch(self.server):
            raise ConfigurationError(
                f"wrap(target={self.target!r}): the client talks to {self.server.describe()} but "
                f"redis_retry_targets[{self.target!r}] is {target.describe()} ({redacted(url)}): its failed writes "
                "would be replayed on another server; wrap it with the target that names its server"
            )

    # -- building ops --------------------------------------------------------------------

    def _script_names(self) -> dict[str, str]:
        """SHA1 of each registered script's source -> its name (what EVALSHA carries)."""
        if self._scripts is None:
            with self._lock:
                self._scripts = script_names(self.producer.settings.scripts)
        return self._scripts

    def command_op(self, args: tuple[Any, ...]) -> RedisOp | None:
        """The op replaying ``args`` (as given to ``execute_command``), or None if not capturable."""
        if not args or not isinstance(args[0], (str, bytes)):
            return None
        name = (args[0].decode() if isinstance(args[0], bytes) else args[0]).upper()
        if name in ("EVALSHA", "EVAL"):
            return self._script_op(name, args)
        if name not in COMMANDS or name in REPLY_CONSUMING:
            return None
        if name not in self.producer.settings.allowed_commands:
            return None
        try:
            return ops.command(name, *args[1:])
        except EncodeError as exc:  # an argument redis-py accepts but the wire format cannot carry
            logger.warning("%s failed and cannot be captured: %s", name, exc)
            return None

    def _script_op(self, name: str, args: tuple[Any, ...]) -> RedisOp | None:
        if len(args) < 3:
            return None
        body = args[1]
        if name == "EVAL":
            body = hashlib.sha1(body.encode() if isinstance(body, str) else body).hexdigest()  # noqa: S324
        sha = body.decode() if isinstance(body, bytes) else str(body)
        script = self._script_names().get(sha.lower())
        if script is None:
            return None  # not in redis_retry_scripts: the workers could not run it
        try:
            numkeys = int(args[2])
            return ops.script(script, keys=args[3 : 3 + numkeys], args=args[3 + numkeys :])
        except (EncodeError, ValueError) as exc:
            logger.warning("script %s failed and cannot be captured: %s", script, exc)
            return None

    def pipeline_op(self, commands: Iterable[tuple[Any, ...]], transaction: bool) -> RedisOp | None:
        """One op of the pipeline's writes, or None if one of its commands forbids capture."""
        writes: list[RedisOp] = []
        for args in commands:
            name = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
            if name.upper() in _HARMLESS:
                continue
            op = self.command_op(args)
            if op is None or op.kind != "command":
                return None
            writes.append(op)
        if not writes:
            return None
        return ops.pipeline(writes, transaction=transaction)

    # -- writing -------------------------------------------------------------------------

    def stamped_write(
        self, args: tuple[Any, ...], *, issued_at: float | None = None, once: bool = True
    ) -> StampedWrite | None:
        """How to send the write ``args`` with its stamp and, if it is not idempotent (and
        ``once``), its op id; None for what is sent as it is (reads, unknown commands,
        stamps off). ``issued_at`` defaults to now."""
        # This runs before every call of a wrapped client: the common case (redis-py's own
        # upper-case command names) costs two dict lookups.
        spec = COMMANDS.get(args[0]) if args and isinstance(args[0], str) else None
        if spec is None:
            if not args or not isinstance(args[0], (str, bytes)):
                return None
            spec = COMMANDS.get((args[0].decode() if isinstance(args[0], bytes) else args[0]).upper())
            if spec is None:
                return None
        if len(args) > LUA_MAX_ARGS or not spec.check_arity(len(args)):
            return None  # Redis' own error says what is wrong, better than a script's would
        name = spec.name
        command = args if args[0] == name else (name, *args[1:])
        settings = self._settings or self.settings
        once = once and not (spec.idempotent if name != "ZADD" else is_idempotent(command))
        if not (settings.write_stamps or once):
            return None
        issued_at = time.time() if issued_at is None else issued_at
        op_id = ops.new_op_id() if once else None
        keys, argv = stamps.direct_step(
            command,
            stamp=stamps.stamp_of(issued_at) if settings.write_stamps else None,
            stamp_ttl=self.stamp_ttl,
            marker=None if op_id is None else marker_for(op_id, args[spec.first_key]),
            marker_ttl=self.marker_ttl,
        )
        return StampedWrite(name, issued_at, op_id, keys, argv)

    @property
    def settings(self) -> Settings:
        """The producer's settings, read on the first write (``install()`` may come after ``wrap()``)."""
        settings = self._settings
        if settings is None:
            try:
                settings = self.producer.settings
            except ConfigurationError:
                # No producer yet: writes still go out stamped, with the default windows,
                # and the settings are looked up again at the next write.
                settings = _DEFAULT_SETTINGS
            else:
                self.check_target(settings)  # raised at every write until the settings are fixed
                self._settings = settings
            self.stamp_ttl = stamps.ttl_ms(settings.max_age, settings.dedupe_ttl)
            self.marker_ttl = settings.marker_ttl_ms(settings.max_retries)
        return settings

    def confirmed(self, marker: bytes) -> list[bytes]:
        """Note the marker of a write whose reply arrived (nothing will replay it); the batch
        of markers to unlink now, if one is due.

        Only writes whose reply was lost need their marker until their replay; the
        others are unlinked in batches, so a hot counter does not leave one key per
        increment behind. A batch that fails is left to the markers' TTL.
        """
        with self._lock:
            self._confirmed.append(marker)
            now = time.monotonic()
            if len(self._confirmed) < _FORGET_BATCH and now - self._forgotten_at < _FORGET_EVERY_S:
                return []
            markers, self._confirmed, self._forgotten_at = self._confirmed, [], now
        return markers

    def stamp_stack(self, stack: list[Any]) -> StampedStack | None:
        """Rewrite a pipeline's stacked writes (in place) into stamped steps, all with one
        issue time; None when nothing is stamped (stamps off, a stack of another kind).

        Pipelined writes carry stamps but no op id: a non-idempotent command of a pipeline
        whose reply was lost can still apply twice (see docs/exactly-once.md).
        """
        if not self.settings.write_stamps or not stack:
            return None
        issued_at = time.time()
        writes: dict[int, tuple[StampedWrite, dict[str, Any]]] = {}
        for index, entry in enumerate(stack):
            args = stacked_args(entry)
            if args is None:
                return None  # not a redis.Redis pipeline's stack: leave it as it is
            write = self.stamped_write(args, issued_at=issued_at, once=False)
            if write is not None:
                writes[index] = (write, entry[1])
        for index, (write, options) in writes.items():
            stack[index] = (write.call, options)
        return StampedStack(issued_at, writes) if writes else None

    def apply_script(self, client: Any) -> Script:
        """``write_stamped.lua`` as a redis-py Script, for a pipeline to load before a transaction."""
        if self._apply_script is None:
            self._apply_script = Script(client, WRITE_STAMPED)
        return self._apply_script

    # -- publishing ----------------------------------------------------------------------

    def tell_captured(self, op: RedisOp, exc: BaseException) -> None:
        """Log a captured write: the first of an outage of its target as a WARNING, the
        others at DEBUG (op ids), counted and told at most once a minute (see :data:`WRITE_OUTAGES`)."""
        target = op.target
        why = f"{type(exc).__name__}: {exc}"
        logger.debug("%s failed (%s); captured for replay as op %s", op_summary(op), why, op.id)
        due = WRITE_OUTAGES.failed(target)
        if due is None:
            return
        what, outage = due
        if what == "started":
            logger.warning("writes to target %r fail (%s): captured for replay, first %s as op %s; further failed "
                           "writes are counted until one succeeds (op ids at DEBUG)", target, why, op_summary(op),
                           op.id)
        else:
            logger.warning("writes to target %r still fail after %.0f s: %d more captured for replay in the last "
                           "%.0f s (%s)", target, WRITE_OUTAGES.seconds(outage), outage.untold,
                           WRITE_OUTAGES.seconds(outage, outage.told_at), why)

    def succeeded(self, args: tuple[Any, ...] | None = None) -> None:
        """A call to this client's target went through: if it was a write (``args`` None: a
        pipeline, or a stamped write), end the target's outage, if it had one, in one line.
        A read alone ends nothing: a read-only replica answers reads while it refuses writes."""
        if self.target not in WRITE_OUTAGES:  # the usual case: one dict lookup per call
            return
        if args is not None and (not args or _command_name(args) not in COMMANDS):
            return
        outage = WRITE_OUTAGES.ended(self.target)
        if outage is not None:
            logger.info("target %r takes writes again: %d failed writes in %.0f s, all captured for replay",
                        self.target, outage.total, WRITE_OUTAGES.seconds(outage))

    def captured(self, op: RedisOp | None, exc: BaseException) -> Any:
        """Publish ``op`` for the failed call and return what the call returns (or raise)."""
        op = self._publishable(op, exc)
        try:
            self.producer.publish(op)
        except RedisRetryError as error:
            raise error from exc
        return self._published(op, exc)

    async def captured_async(self, op: RedisOp | None, exc: BaseException) -> Any:
        """:meth:`captured` for a coroutine: a publish that may block runs in a thread."""
        op = self._publishable(op, exc)
        try:
            await self.producer.publish_async(op)
        except RedisRetryError as error:
            raise error from exc
        return self._published(op, exc)

    def _publishable(self, op: RedisOp | None, exc: BaseException) -> RedisOp:
        if op is None:
            raise exc
        op = op.with_error(exc).with_source(self.source or _caller())
        if self.priority is not None:
            op = op.with_priority(self.priority)
        return op.with_target(self.target) if self.target != "default" else op

    def _published(self, op: RedisOp, exc: BaseException) -> None:
        self.tell_captured(op, exc)
        if self.on_capture is not None:
            self.on_capture(op)
        if self.raise_on_capture:
            raise CapturedWriteError(
                f"{op_summary(op)} failed ({type(exc).__name__}: {exc}); captured for replay as op {op.id}", op
            ) from exc


def _caller() -> str:
    """``module.function`` of the application code that issued the write (the op's source)."""
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.split(".", 1)[0] not in _OWN_PACKAGES:
            return f"{module}.{frame.f_code.co_name}"
        frame = frame.f_back  # type: ignore[assignment]
    return "celery_redis_retry.wrap"


def stacked_args(entry: Any) -> tuple[Any, ...] | None:
    # redis.Redis pipelines stack (args, options) pairs.
    if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], tuple):
        return entry[0]
    return None


def script_names(scripts: Mapping[str, str]) -> dict[str, str]:
    """SHA1 -> name for a ``redis_retry_scripts`` mapping (what wrapped EVALSHA calls are matched with)."""
    return {hashlib.sha1(src.encode()).hexdigest(): name for name, src in scripts.items()}  # noqa: S324
