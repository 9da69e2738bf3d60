"""Step 1 of the flow without boilerplate: a redis-py client whose failed writes are captured.

``wrap(client)`` returns a copy of a ``redis.Redis`` client (same connection pool,
same options, same class plus capture) on which a write command that fails with a
retryable error is built into an op and published for replay, exactly as the
:class:`~celery_redis_retry.on_failure` guard would do by hand::

    r = redis.Redis(host="cache", socket_timeout=0.5, retry=Retry(NoBackoff(), 0))
    cache = celery_redis_retry.wrap(r)
    cache.set("user:42", payload, ex=300)   # Redis down: published, returns None
    cache.get("user:42")                    # reads are never captured: raises

What is captured, and what is not:

* single write commands of :data:`celery_redis_retry.redis_commands.COMMANDS` that the
  producer's ``redis_retry_allowed_commands`` allow, built with
  :func:`celery_redis_retry.ops.command` (relative expiries become absolute);
* ``EVALSHA``/``EVAL`` of a script whose source is registered in
  ``redis_retry_scripts`` (so ``client.register_script(src)(keys=..., args=...)``
  works), as :func:`~celery_redis_retry.ops.script` ops that carry its name only;
* pipelines, as one :func:`~celery_redis_retry.ops.pipeline` op of their write
  commands (reads are dropped), ``transaction=`` kept;
* never: reads; writes whose reply *is* the point (LPOP, SPOP, GETDEL, LMOVE...:
  a replay would throw the popped value away); pipelines that used WATCH (the
  optimistic check cannot be replayed); pipelines holding a command that is
  neither a capturable write nor a known read; locks (``client.lock()`` always
  runs on the plain client); non-retryable errors (WRONGTYPE, syntax...).
  In all these cases the Redis error is raised as if the client were not wrapped.

A captured call returns None (redis-py's "no result": ``SET`` returns True when it
wrote, so None never reads as success) and logs its op id at DEBUG; the first failed
write of a target's outage is a WARNING, a write that goes through again an INFO with
the count (see :data:`WRITE_OUTAGES`). With
``raise_on_capture=True`` it raises :class:`CapturedWriteError` instead, carrying the
op and chained to the Redis error. ``on_capture`` is called with each captured op
(metrics, tracing, tests). If the op cannot be published either (spool full...), the
:class:`~celery_redis_retry.errors.RedisRetryError` that says why is raised from the
Redis error, as ``on_failure`` does.

Every write of the table goes out as one ``EVALSHA`` of ``write_stamped.lua`` that runs
it and stamps its keys with the time it was issued (see :mod:`celery_redis_retry.stamps`),
so that no replay overwrites it; the reply is the plain command's. A non-idempotent write
(INCRBY, LPUSH...) also carries its op id and a marker holding its reply: redis-py's own
retries of it, and the replay of its capture, find the marker instead of applying it again.
Pipelines are stamped command by command, without op ids.

Opting out per call: the client you passed in is unchanged, use it (or
``wrapped.uncaptured``, the same object) for writes that must not be replayed.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import msgspec
import redis
from redis.commands import READ_COMMANDS
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from celery_redis_retry import ops, policy, stamps
from celery_redis_retry.capture.producer import RetryProducer
from celery_redis_retry.config import Settings
from celery_redis_retry.errors import CapturedWriteError, ConfigurationError, EncodeError, RedisRetryError
from celery_redis_retry.ops import RedisOp
from celery_redis_retry.outage_log import Outages
from celery_redis_retry.redis_commands import COMMANDS, LUA_MAX_ARGS, is_idempotent
from celery_redis_retry.slots import marker_for, slot_of
from celery_redis_retry.stamps import WRITE_STAMPED, WRITE_STAMPED_SHA
from celery_redis_retry.targets import TargetAddress, client_address, parse_target_url, redacted

logger = logging.getLogger(__name__)

#: The targets whose writes fail now, for the whole process: an outage is one line when it
#: starts, a count at most once a minute, and one line when a write goes through again.
WRITE_OUTAGES = Outages()

R = TypeVar("R")

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


class _Capture:
    """What a wrapped client and its pipelines share: where and how ops are published."""

    def __init__(
        self,
        producer: RetryProducer | None,
        source: str | None,
        target: str,
        raise_on_capture: bool,
        on_capture: Callable[[RedisOp], None] | None,
    ) -> None:
        self._producer = producer
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

    def forget_marker(self, marker: bytes, client: Any) -> None:
        """Drop the marker of a write whose reply arrived: nothing will replay it.

        Only writes whose reply was lost need their marker until their replay; the
        others are unlinked in batches, so a hot counter does not leave one key per
        increment behind. A batch that fails is left to the markers' TTL.
        """
        with self._lock:
            self._confirmed.append(marker)
            now = time.monotonic()
            if len(self._confirmed) < _FORGET_BATCH and now - self._forgotten_at < _FORGET_EVERY_S:
                return
            markers, self._confirmed, self._forgotten_at = self._confirmed, [], now
        try:
            pipe = client.pipeline(transaction=False)
            for key in markers:
                pipe.unlink(key)
            pipe.execute(raise_on_error=False)
        except Exception as exc:  # noqa: BLE001 - the markers expire on their own
            logger.debug("could not unlink %d confirmed write markers: %s", len(markers), exc)

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
            args = _stacked_args(entry)
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
        if op is None:
            raise exc
        op = op.with_error(exc).with_source(self.source or _caller())
        if self.target != "default":
            op = op.with_target(self.target)
        try:
            self.producer.publish(op)
        except RedisRetryError as error:
            raise error from exc
        self.tell_captured(op, exc)
        if self.on_capture is not None:
            self.on_capture(op)
        if self.raise_on_capture:
            raise CapturedWriteError(
                f"{op_summary(op)} failed ({type(exc).__name__}: {exc}); captured for replay as op {op.id}", op
            ) from exc
        return None


class StampedWrite:
    """One write sent through ``write_stamped.lua``: applied with its stamp (and marker), its
    reply given back as the plain command's would be."""

    __slots__ = ("argv", "issued_at", "keys", "name", "op_id")

    def __init__(self, name: str, issued_at: float, op_id: str | None, keys: list[Any], argv: list[Any]) -> None:
        self.name = name
        self.issued_at = issued_at
        self.op_id = op_id
        self.keys = keys
        self.argv = argv

    @property
    def call(self) -> tuple[Any, ...]:
        """The ``EVALSHA`` that sends this write."""
        return ("EVALSHA", WRITE_STAMPED_SHA, len(self.keys), *self.keys, *self.argv)

    def run(self, execute: Callable[..., Any], client: Any, options: dict[str, Any]) -> Any:
        """Send the write with ``execute`` (the client's own), loading the script if needed."""
        try:
            reply = execute(*self.call, **options)
        except NoScriptError:
            execute("SCRIPT LOAD", WRITE_STAMPED)
            reply = execute(*self.call, **options)
        return self.parsed(client, reply, options)

    def parsed(self, client: Any, reply: Any, options: dict[str, Any]) -> Any:
        """``reply`` as redis-py returns it for the plain command (``SET`` -> True...)."""
        if isinstance(reply, Exception):
            return reply
        callbacks = getattr(client, "response_callbacks", None) or _default_callbacks()
        callback = callbacks.get(self.name)
        return callback(reply, **options) if callback is not None else reply

    def issued(self, op: RedisOp) -> RedisOp:
        """``op`` (the capture of this write) with the id and issue time the write was sent with.

        Its replay then carries the same stamp, and finds the marker if Redis applied
        the write although its reply was lost.
        """
        return msgspec.structs.replace(op, id=self.op_id or op.id, created_at=self.issued_at)


class StampedStack:
    """A pipeline's writes rewritten into stamped steps: where they are, and how to read their replies."""

    __slots__ = ("issued_at", "writes")

    def __init__(self, issued_at: float, writes: dict[int, tuple[StampedWrite, dict[str, Any]]]) -> None:
        self.issued_at = issued_at
        self.writes = writes

    def parsed(self, client: Any, replies: list[Any]) -> list[Any]:
        """The pipeline's replies, each stamped write's as its plain command's would be."""
        out = list(replies)
        for index, (write, options) in self.writes.items():
            out[index] = write.parsed(client, out[index], options)
        return out

    def missing_script(self, replies: list[Any]) -> list[int]:
        """Indexes of the stamped writes the server refused with NOSCRIPT (it lost its scripts)."""
        return [i for i in self.writes if isinstance(replies[i], NoScriptError)]


_callbacks: dict[str, Any] = {}


def _default_callbacks() -> Any:
    # A cluster client parses replies per node with redis-py's standard callbacks.
    if not _callbacks:
        _callbacks.update(redis.Redis().response_callbacks)
    return _callbacks


def _caller() -> str:
    """``module.function`` of the application code that issued the write (the op's source)."""
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.split(".", 1)[0] not in _OWN_PACKAGES:
            return f"{module}.{frame.f_code.co_name}"
        frame = frame.f_back  # type: ignore[assignment]
    return "celery_redis_retry.wrap"


class _CapturingClient:
    """Mixed in before the client's own class: capture around ``execute_command``."""

    _crr_capture: _Capture
    _crr_plain: Any

    def execute_command(self, *args: Any, **options: Any) -> Any:
        capture = self._crr_capture
        write = capture.stamped_write(args)
        try:
            if write is None:
                reply = super().execute_command(*args, **options)  # type: ignore[misc]
                capture.succeeded(args)
                return reply
            reply = write.run(super().execute_command, self, options)  # type: ignore[misc]
        except Exception as exc:
            if not policy.is_retryable(exc):
                raise
            op = capture.command_op(args)
            if op is not None and write is not None:
                op = write.issued(op)
            return capture.captured(op, exc)
        if write.op_id is not None:
            capture.forget_marker(write.keys[-1], self._crr_plain)
        capture.succeeded()
        return reply

    @property
    def uncaptured(self) -> Any:
        """The client that was wrapped: its failed writes are not captured."""
        return self._crr_plain

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        pipe = super().pipeline(transaction, shard_hint)  # type: ignore[misc]
        pipe.__class__ = _capturing_class(type(pipe), _CapturingPipeline)
        pipe._crr_capture = self._crr_capture
        return pipe

    def _split_command_across_slots(self, command: str, *keys: Any) -> Any:
        # A cluster client sends DEL/UNLINK through a pipeline per slot; keys of one slot
        # go through execute_command instead, so the write is stamped like any other
        # (and a captured one returns None, as everywhere).
        if len({slot_of(key) for key in keys}) == 1:
            return self.execute_command(command, *keys)
        return super()._split_command_across_slots(command, *keys)  # type: ignore[misc]

    def lock(self, *args: Any, **kwargs: Any) -> Any:
        # A lock taken later by a replay would be held by nobody: locks are never captured.
        return self._crr_plain.lock(*args, **kwargs)

    def client(self) -> Any:
        return _copy_with_capture(self._crr_plain.client(), self._crr_capture)

    def close(self) -> None:
        # The pool belongs to the wrapped client, which closes it when it goes away.
        self._crr_plain.close()

    def __del__(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"wrap({self._crr_plain!r})"


class _CapturingPipeline:
    """Mixed in before the pipeline's own class: capture around ``execute``."""

    _crr_capture: _Capture
    command_stack: list[Any]
    watching: bool
    transaction: bool
    explicit_transaction: bool

    def execute(self, raise_on_error: bool = True) -> Any:
        # execute() empties the stack whatever happens: keep what it held.
        stack = list(self.command_stack)
        # A cluster pipeline has neither WATCH nor an explicit MULTI.
        watched = getattr(self, "watching", False)
        transaction = bool(getattr(self, "transaction", False) or getattr(self, "explicit_transaction", False))
        capture = self._crr_capture
        stamped = None if watched else capture.stamp_stack(self.command_stack)
        try:
            if stamped is None:
                replies = super().execute(raise_on_error)  # type: ignore[misc]
                capture.succeeded()
                return replies
            if transaction:
                # A transaction cannot be re-run in part: make sure the server has the script.
                self.scripts.add(capture.apply_script(self))  # type: ignore[attr-defined]
            replies = super().execute(False)  # type: ignore[misc]
            if not transaction and (missing := stamped.missing_script(replies)):
                # The server lost its scripts (a restart): those writes did not run. Send them
                # again, with the reads of the pipeline, so that a read still follows its write.
                self.immediate_execute_command("SCRIPT LOAD", WRITE_STAMPED)  # type: ignore[attr-defined]
                again = [i for i, entry in enumerate(stack) if i in missing or _is_read(entry)]
                for index in again:
                    write_options = stamped.writes.get(index)
                    self.command_stack.append(stack[index] if write_options is None else
                                              (write_options[0].call, write_options[1]))
                for index, reply in zip(again, super().execute(False), strict=True):  # type: ignore[misc]
                    replies[index] = reply
        except Exception as exc:
            if not policy.is_retryable(exc) or watched or not stack:
                raise
            commands = [_stacked_args(entry) for entry in stack]
            op = None if None in commands else capture.pipeline_op(commands, transaction)  # type: ignore[arg-type]
            if op is not None and stamped is not None:
                op = msgspec.structs.replace(op, created_at=stamped.issued_at)
            return capture.captured(op, exc)
        replies = stamped.parsed(self, replies)
        capture.succeeded()
        if raise_on_error:
            self.raise_first_error(stack, replies)  # type: ignore[attr-defined]
        return replies


def _is_read(entry: Any) -> bool:
    args = _stacked_args(entry)
    name = args[0] if args else b""
    return (name.decode() if isinstance(name, bytes) else str(name)).upper() in READ_COMMANDS


def _stacked_args(entry: Any) -> tuple[Any, ...] | None:
    # redis.Redis pipelines stack (args, options) pairs.
    if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], tuple):
        return entry[0]
    return None


_classes: dict[tuple[type, type], type] = {}


def _capturing_class(base: type, mixin: type) -> type:
    """``base`` with ``mixin`` in front, made once per class."""
    cls = _classes.get((base, mixin))
    if cls is None:
        if issubclass(base, mixin):
            return base
        cls = _classes[(base, mixin)] = type(f"Capturing{base.__name__}", (mixin, base), {"__module__": __name__})
    return cls


def _copy_with_capture(client: Any, capture: _Capture) -> Any:
    copy: Any = object.__new__(_capturing_class(type(client), _CapturingClient))
    copy.__dict__.update(client.__dict__)
    copy._crr_plain = client
    copy._crr_capture = capture
    return copy


def wrap(
    client: R,
    *,
    producer: RetryProducer | None = None,
    source: str | None = None,
    target: str = "default",
    raise_on_capture: bool = False,
    on_capture: Callable[[RedisOp], None] | None = None,
) -> R:
    """A copy of a redis-py ``client`` whose failed writes are published for replay.

    The copy shares the client's connection pool and options and is an instance of
    its class (``isinstance(wrapped, redis.Redis)`` holds); ``client`` itself is left
    as it is. ``producer`` defaults to the process-wide one of the app given to
    :func:`celery_redis_retry.install`. ``source`` names the code in DLQ records
    (default: the calling ``module.function``); ``target`` is the entry of
    ``redis_retry_targets`` this client writes to. See the module documentation for
    what is captured and what a captured call returns.

    :raises TypeError: for an asyncio client (not supported yet) or a non-client.
    :raises ConfigurationError: when ``target`` is not in ``redis_retry_targets`` or its
        URL names another server than the client's (host, port and db; socket path;
        Sentinel service; for a cluster, a node in common). Checked here when the
        settings can be read, else at the first write, which then raises it.
    """
    plain: Any = client
    if isinstance(plain, _CapturingClient):
        plain = plain.uncaptured
    execute = getattr(plain, "execute_command", None)
    if execute is None or not hasattr(plain, "__dict__"):
        raise TypeError(f"wrap() takes a redis-py client, got {type(client).__name__}")
    if inspect.iscoroutinefunction(execute):
        raise TypeError("wrap() does not support redis.asyncio clients yet; use the on_failure guard")
    if not isinstance(target, str) or not target:
        raise TypeError(f"target must be a non-empty string, got {target!r}")
    capture = _Capture(producer, source, target, raise_on_capture, on_capture)
    capture.check_server(plain)
    wrapped: R = _copy_with_capture(plain, capture)
    return wrapped


def script_names(scripts: Mapping[str, str]) -> dict[str, str]:
    """SHA1 -> name for a ``redis_retry_scripts`` mapping (what wrapped EVALSHA calls are matched with)."""
    return {hashlib.sha1(src.encode()).hexdigest(): name for name, src in scripts.items()}  # noqa: S324


__all__ = ["REPLY_CONSUMING", "CapturedWriteError", "op_summary", "wrap"]
