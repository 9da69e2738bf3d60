"""Step 6 of the flow: run an op on its target Redis, at most once where it matters.

Kafka and Celery deliver at least once, and a write that "failed" with a timeout may
already have been applied. Replaying SET or DEL twice is harmless; replaying INCRBY or
LPUSH twice is not. So:

* idempotent commands (see :mod:`celery_redis_retry.redis_commands`) and pipelines made only
  of them run as they are;
* everything else (non-idempotent commands, transactions, pipelines holding a
  non-idempotent command, registered scripts) runs inside one Lua step that first sets
  a dedupe marker ``SET <marker> 1 NX PX <ttl>`` and applies the commands only when the
  marker was new. The marker shares the Redis Cluster slot of the op's keys (it carries
  their hash tag), so the step is atomic on a cluster too.

The marker must outlive every way the same op can come back: its own retries (up to
``Backoff.total(max_retries)``), Celery redelivering a task a dead worker held (the
broker's visibility timeout, an hour by default), and above all Kafka redelivering what
a crashed bridge had not committed, which can happen as late as the topic's retention
allows. So it lives ``redis_retry_dedupe_ttl`` (default 7 days, Kafka's default
retention; keep it >= the topic's ``retention.ms``), and never less than the op's retry
window plus an hour.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis._parsers import _RESP2Parser
from redis.exceptions import NoScriptError

from celery_redis_retry import policy, stamps
from celery_redis_retry.config import Settings
from celery_redis_retry.errors import PermanentReplayError, UnknownScriptError
from celery_redis_retry.ops import Arg, Command, RedisOp
from celery_redis_retry.redis_commands import LUA_MAX_ARGS, is_idempotent, spec_for
from celery_redis_retry.slots import group_by_slot, marker_key
from celery_redis_retry.targets import TargetClients

logger = logging.getLogger(__name__)


#: The Lua step replays run (see ``apply_once.lua``).
APPLY_ONCE = (Path(__file__).parent / "apply_once.lua").read_text()
# A registered script runs inside this wrapper, which adds the dedupe marker as the last
# key and its TTL as the last argument, then calls the user's code with the rest.
_SCRIPT_WRAPPER = """\
if not redis.call('SET', KEYS[#KEYS], '1', 'NX', 'PX', ARGV[#ARGV]) then
  return redis.status_reply('CRR-ALREADY-APPLIED')
end
local keys, argv = {}, {}
for i = 1, #KEYS - 1 do keys[i] = KEYS[i] end
for i = 1, #ARGV - 1 do argv[i] = ARGV[i] end
local user_script = function(KEYS, ARGV)
%s
end
return user_script(keys, argv)
"""
_ALREADY_APPLIED = b"CRR-ALREADY-APPLIED"











# -- outcomes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayResult:
    """What running an op on Redis did, to the op and to each of its commands.

    ``outcome`` is ``applied``, ``duplicate`` (a dedupe marker proved it ran before,
    nothing was written) or ``superseded`` (its guard failed: a newer write won, nothing
    was written). Only ``applied`` means the op's commands ran.
    """

    outcome: str
    #: Per command: None if it succeeded (or did not run), else the Redis error it got.
    command_errors: tuple[str | None, ...] = ()


_NO_GUARD: list[Arg] = ["", "", ""]
_APPLIED_ONE_COMMAND = ReplayResult("applied", (None,))


@dataclass(frozen=True)
class _Call:
    """One Lua step to run: which script, its keys and its arguments."""

    script: str  # "apply_once" or "user:<name>"
    source: str
    keys: list[Arg]
    args: list[Arg]
    commands: int  # how many of the op's commands it applies (for the per-command outcome)


class Executor:
    """Runs ops on their targets with the settings' scripts and dedupe TTL."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.clients = TargetClients(settings.targets)
        self._scripts: dict[tuple[int, str], Any] = {}
        self._marker_ttls: dict[int, int] = {}

    # -- one op --------------------------------------------------------------------------

    def run(self, op: RedisOp) -> ReplayResult:
        """Apply ``op`` once. Redis errors propagate for the caller to classify."""
        client = self.clients.get(op.target)
        mode = self._mode(op)
        if mode == "plain":
            # Running these twice leaves Redis as running them once: no marker needed.
            if op.kind == "command":
                client.execute_command(*op.commands[0])
                return _APPLIED_ONE_COMMAND
            pipe = client.pipeline(transaction=False)
            for command in op.commands:
                pipe.execute_command(*command)
            return _plain_outcome(op, pipe.execute(raise_on_error=False))
        if mode == "per_slot":
            return self._run_per_slot(client, op)
        call = self._call(op)
        reply = self._script(client, call)(keys=call.keys, args=call.args, client=client)
        return _lua_outcome(op, call, reply)

    def _mode(self, op: RedisOp) -> str:
        if op.kind == "script" or op.guard is not None or op.transaction:
            return "lua"
        if op.kind == "command":
            return "lua" if self.settings.write_stamps or not is_idempotent(op.commands[0]) else "plain"
        if not self.settings.write_stamps and all(is_idempotent(c) for c in op.commands):
            return "plain"
        if self.clients.is_cluster(op.target):
            return "per_slot"
        return "lua"

    def _run_per_slot(self, client: Any, op: RedisOp) -> ReplayResult:
        """A cross-slot pipeline on a cluster: one atomic step, with its own marker, per slot.

        A retry after a partial failure skips the slots already applied (their markers
        exist) and replays only the others.
        """
        keys_of = [[command[i] for i in spec_for(str(command[0])).key_positions(len(command))]
                   for command in op.commands]
        errors: list[str | None] = [None] * len(op.commands)
        outcomes = set()
        for part, indexes in enumerate(group_by_slot(op.commands, keys_of)):
            commands = tuple(op.commands[i] for i in indexes)
            anchor = next((k for i in indexes for k in keys_of[i]), None)
            call = self._once_call(op, commands, marker_key(op, anchor, part) if _needs_marker(op) else None)
            reply = self._script(client, call)(keys=call.keys, args=call.args, client=client)
            result = _parse_once(reply, len(commands))
            outcomes.add(result.outcome)
            for i, error in zip(indexes, result.command_errors, strict=True):
                errors[i] = error
        outcome = outcomes.pop() if len(outcomes) == 1 else "applied"
        return _checked(op, ReplayResult(outcome, tuple(errors)))

    # -- many ops, one round trip --------------------------------------------------------

    def run_many(self, ops: list[RedisOp]) -> list[ReplayResult | Exception]:
        """Apply ops of one target in a single pipelined round trip; one result per op.

        Each result is a :class:`ReplayResult` or the exception that op met, so one failing
        op does not hide the others. An exception raised instead (the connection failed)
        concerns the whole round trip: some ops may have been applied, and markers make
        running them again harmless. A script not yet loaded on the server is loaded by
        running that op on its own.
        """
        if not ops:
            return []
        client = self.clients.get(ops[0].target)
        pipe = client.pipeline(transaction=False)
        plans = [self._queue(pipe, op) for op in ops]
        replies = iter(pipe.execute(raise_on_error=False) if any(p[1] for p in plans) else [])
        results: list[ReplayResult | Exception] = []
        for op, (mode, count, detail) in zip(ops, plans, strict=True):
            chunk = [next(replies) for _ in range(count)]
            try:
                results.append(self._result(op, mode, detail, chunk))
            except Exception as exc:  # noqa: BLE001 - this op's own failure, reported as its result
                results.append(exc)
        return results

    def _queue(self, pipe: Any, op: RedisOp) -> tuple[str, int, _Call | Exception | None]:
        """Add ``op`` to the pipeline; return how to read its replies back."""
        mode = self._mode(op)
        if mode == "plain":
            for command in op.commands:
                pipe.execute_command(*command)
            return mode, len(op.commands), None
        if mode == "per_slot":
            return mode, 0, None  # runs on its own, one step per slot
        try:
            call = self._call(op)
        # Too large, unknown script, a created_at whose stamp overflows: this op's own failure,
        # never its batch's (raised here, it would fail every op of the round trip).
        except Exception as exc:  # noqa: BLE001
            return "refused", 0, exc
        pipe.execute_command("EVALSHA", _sha(call.source), len(call.keys), *call.keys, *call.args)
        return mode, 1, call

    def _result(self, op: RedisOp, mode: str, detail: _Call | Exception | None, chunk: list[Any]) -> ReplayResult:
        if isinstance(detail, Exception):
            raise detail
        if mode == "per_slot":
            return self.run(op)
        if mode == "plain":
            return _plain_outcome(op, chunk)
        if isinstance(chunk[0], NoScriptError):
            return self.run(op)  # loads the script, then runs the op
        if isinstance(chunk[0], Exception):
            raise chunk[0]
        assert isinstance(detail, _Call)
        return _lua_outcome(op, detail, chunk[0])

    # -- building Lua steps --------------------------------------------------------------

    def _call(self, op: RedisOp) -> _Call:
        if op.kind == "script":
            name = op.script or ""
            source = self.settings.scripts.get(name)
            if source is None:
                raise UnknownScriptError(f"script {name!r} is not registered in redis_retry_scripts")
            return _Call(
                f"user:{name}", _wrap_user_script(source), [*op.keys, marker_key(op)],
                [*op.args, self._marker_ttl_ms(op)], 1,
            )
        return self._once_call(op, op.commands, marker_key(op) if _needs_marker(op) else None)

    def _once_call(self, op: RedisOp, commands: tuple[Command, ...], marker: bytes | None) -> _Call:
        guard = op.guard
        guard_key: Arg | None = None
        condition: list[Arg] = _NO_GUARD
        if guard is not None:
            guard_key = guard.key
            expected = guard.expected if guard.kind == "value" else guard.version
            condition = [guard.kind, "" if guard.field is None else guard.field, "" if expected is None else expected]
        for command in commands:
            if len(command) > LUA_MAX_ARGS:
                raise PermanentReplayError(
                    f"{command[0]!s} has {len(command)} arguments: too many to apply atomically "
                    f"(at most {LUA_MAX_ARGS}); split the op",
                    reason="too_large",
                )
        settings = self.settings
        keys, argv = stamps.step(
            commands,
            mode="t" if op.transaction else "r",
            stamp=stamps.stamp_of(op.created_at) if settings.write_stamps else None,
            stamp_ttl=stamps.ttl_ms(settings.max_age, settings.dedupe_ttl),
            marker=marker,
            marker_ttl=self._marker_ttl_ms(op),
            guard=condition,
            guard_key=guard_key,
        )
        return _Call("apply_once", APPLY_ONCE, keys, argv, len(commands))

    def _marker_ttl_ms(self, op: RedisOp) -> int:
        retries = self.settings.max_retries if op.max_retries is None else op.max_retries
        ttl = self._marker_ttls.get(retries)
        if ttl is None:
            ttl = self._marker_ttls[retries] = self.settings.marker_ttl_ms(retries)
        return ttl

    def _script(self, client: Any, call: _Call) -> Any:
        # redis-py's Script handles NOSCRIPT itself: SCRIPT LOAD, then EVALSHA again.
        key = (id(client), call.script)
        script = self._scripts.get(key)
        if script is None:
            script = self._scripts[key] = client.register_script(call.source)
        return script


def _needs_marker(op: RedisOp) -> bool:
    # Running the op twice must not change the result twice: anything but idempotent
    # commands, and transactions and guarded ops, whose "all or nothing" it protects.
    return op.transaction or op.guard is not None or not all(is_idempotent(c) for c in op.commands)


# -- reading replies ---------------------------------------------------------------------


def _sha(source: str) -> str:
    return _shas.get(source) or _shas.setdefault(source, hashlib.sha1(source.encode()).hexdigest())  # noqa: S324


_shas: dict[str, str] = {}


def _parse_once(reply: Any, commands: int) -> ReplayResult:
    if reply[0] == 0:
        return ReplayResult("duplicate", (None,) * commands)
    if reply[0] == 2:
        return ReplayResult("superseded", (None,) * commands)
    return ReplayResult(
        "applied",
        tuple(None if r in (1, 2) else (r.decode() if isinstance(r, bytes) else str(r)) for r in reply[1:]),
    )


def _lua_outcome(op: RedisOp, call: _Call, reply: Any) -> ReplayResult:
    if call.script != "apply_once":
        return ReplayResult("duplicate" if reply == _ALREADY_APPLIED else "applied", (None,))
    return _checked(op, _parse_once(reply, call.commands))


_PARSER = _RESP2Parser(socket_read_size=65536)  # type: ignore[no-untyped-call]


def _plain_outcome(op: RedisOp, replies: Sequence[Any]) -> ReplayResult:
    """The outcome of commands run as they are; raise the error one of them met.

    A retryable reply (LOADING, READONLY...) is raised as it is, so the op is retried;
    any other error ends it with a permanent reason.
    """
    errors = [r for r in replies if isinstance(r, Exception)]
    if not errors:
        return _APPLIED_ONE_COMMAND if len(replies) == 1 else ReplayResult("applied", (None,) * len(replies))
    retryable = [r for r in errors if policy.is_retryable(r)]
    if retryable:
        raise retryable[0]
    return _checked(op, ReplayResult("applied", tuple(str(r) if isinstance(r, Exception) else None for r in replies)))


def _checked(op: RedisOp, applied: ReplayResult) -> ReplayResult:
    failed = [(i, e) for i, e in enumerate(applied.command_errors) if e is not None]
    if failed:
        # An error the target would not give a moment later (OOM, READONLY, LOADING...)
        # is raised as redis-py would have raised it: the op is retried, not ended.
        for _, message in failed:
            error = _PARSER.parse_error(message)  # type: ignore[no-untyped-call]
            if policy.is_retryable(error):
                raise error
        index, message = failed[0]
        raise PermanentReplayError(
            f"command {index} ({op.commands[index][0]!s}) of op {op.id} failed: {message}"
            + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""),
            reason=policy.permanent_reason(message),
        )
    return applied


def _wrap_user_script(source: str) -> str:
    # A "#!lua flags=..." shebang must stay on the first line.
    if source.startswith("#!"):
        shebang, _, body = source.partition("\n")
        return shebang + "\n" + _SCRIPT_WRAPPER % body
    return _SCRIPT_WRAPPER % source






