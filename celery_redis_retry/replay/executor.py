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

A batch's Lua steps run together: one script call (``apply_batch.lua``) applies up to
:data:`STEP_OPS` ops of one slot, each still atomic and with its own outcome. The ops go
to Redis as one MessagePack argument, packed in C, instead of one EVALSHA of twenty-odd
arguments each, which redis-py would encode one by one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from redis.exceptions import NoScriptError, ResponseError

from celery_redis_retry import policy, stamps
from celery_redis_retry.config import Settings
from celery_redis_retry.errors import PermanentReplayError, UnknownScriptError
from celery_redis_retry.ops import Arg, Command, RedisOp
from celery_redis_retry.redis_commands import LUA_MAX_ARGS, is_idempotent, spec_for
from celery_redis_retry.replay.outcomes import (
    ALREADY_APPLIED,
    APPLIED_ONE_COMMAND,
    ReplayResult,
    checked,
    parse_once,
    plain_outcome,
)
from celery_redis_retry.replay.steps import APPLY, STEP_OPS, Call, packed, sha, strings, wrap_user_script
from celery_redis_retry.slots import group_by_slot, marker_key, slot_of
from celery_redis_retry.targets import TargetClients

logger = logging.getLogger(__name__)





_NO_GUARD: list[Arg] = ["", "", ""]




class Executor:
    """Runs ops on their targets with the settings' scripts and dedupe TTL."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.clients = TargetClients(settings.targets)
        self._scripts: dict[tuple[int, str], Any] = {}
        self._marker_ttls: dict[int, int] = {}
        self._stamp_ttl_ms = stamps.ttl_ms(settings.max_age, settings.dedupe_ttl)

    # -- one op --------------------------------------------------------------------------

    def run(self, op: RedisOp) -> ReplayResult:
        """Apply ``op`` once. Redis errors propagate for the caller to classify."""
        client = self.clients.get(op.target)
        mode = self._mode(op)
        if mode == "plain":
            # Running these twice leaves Redis as running them once: no marker needed.
            if op.kind == "command":
                client.execute_command(*op.commands[0])
                return APPLIED_ONE_COMMAND
            pipe = client.pipeline(transaction=False)
            for command in op.commands:
                pipe.execute_command(*command)
            return plain_outcome(op, pipe.execute(raise_on_error=False))
        if mode == "per_slot":
            return self._run_per_slot(client, op)
        call = self._call(op)
        if call.script == "apply_once":
            reply = self._apply(client, [call])[0]
            if isinstance(reply, Exception):
                raise reply
        else:
            reply = self._script(client, call.script, call.source)(keys=call.keys, args=call.args, client=client)
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
            reply = self._apply(client, [call])[0]
            if isinstance(reply, Exception):
                raise reply
            result = parse_once(reply, len(commands))
            outcomes.add(result.outcome)
            for i, error in zip(indexes, result.command_errors, strict=True):
                errors[i] = error
        outcome = outcomes.pop() if len(outcomes) == 1 else "applied"
        return checked(op, ReplayResult(outcome, tuple(errors)))

    def _apply(self, client: Any, calls: list[Call]) -> list[Any]:
        """Run one batch step of ``apply_once`` calls on its own (loading the script if needed)."""
        script = self._script(client, "apply", APPLY)
        return list(script(keys=calls[0].keys[:1], args=[packed(calls)], client=client))

    # -- many ops, one round trip --------------------------------------------------------

    def run_many(self, ops: list[RedisOp]) -> list[ReplayResult | Exception]:
        """Apply ops of one target in a single pipelined round trip; one result per op.

        Each result is a :class:`ReplayResult` or the exception that op met, so one failing
        op does not hide the others. An exception raised instead (the connection failed)
        concerns the whole round trip: some ops may have been applied, and markers make
        running them again harmless. Consecutive Lua ops share batch steps; the pipeline
        keeps the ops' order, so two ops of one key run in the order they came.
        """
        if not ops:
            return []
        client = self.clients.get(ops[0].target)
        pipe = client.pipeline(transaction=False)
        plans = [self._plan(op) for op in ops]
        entries = list(self._queue(pipe, ops, plans))
        replies_of: list[list[Any]] = [[] for _ in ops]
        if entries:
            for (kind, indexes), reply in zip(entries, pipe.execute(raise_on_error=False), strict=True):
                if kind == "step":
                    step = self._step_replies(client, [plans[i][1] for i in indexes], reply)  # type: ignore[misc]
                    for i, one in zip(indexes, step, strict=True):
                        replies_of[i].append(one)
                else:
                    replies_of[indexes[0]].append(reply)
        results: list[ReplayResult | Exception] = []
        for op, (mode, detail), replies in zip(ops, plans, replies_of, strict=True):
            try:
                results.append(self._result(op, mode, detail, replies))
            except Exception as exc:  # noqa: BLE001 - this op's own failure, reported as its result
                results.append(exc)
        return results

    def _plan(self, op: RedisOp) -> tuple[str, Call | Exception | None]:
        """How ``op`` runs in a batch: ``plain``, ``per_slot``, ``step``, ``script`` or ``refused``."""
        mode = self._mode(op)
        if mode != "lua":
            return mode, None
        try:
            call = self._call(op)
        # Too large, unknown script, a created_at whose stamp overflows: this op's own failure,
        # never its batch's (raised here, it would fail every op of the round trip).
        except Exception as exc:  # noqa: BLE001
            return "refused", exc
        return ("step" if call.script == "apply_once" else "script"), call

    def _queue(
        self, pipe: Any, ops: list[RedisOp], plans: list[tuple[str, Call | Exception | None]]
    ) -> Iterator[tuple[str, list[int]]]:
        """Queue the batch's commands in op order; yield what each pipeline command covers."""
        target = ops[0].target
        waiting: list[int] = []  # consecutive step ops, not yet queued
        for index, (mode, detail) in enumerate(plans):
            if mode == "step":
                waiting.append(index)
                continue
            yield from self._queue_steps(pipe, target, plans, waiting)
            waiting = []
            if mode == "plain":
                for command in ops[index].commands:
                    pipe.execute_command(*command)
                    yield "plain", [index]
            elif mode == "script":
                assert isinstance(detail, Call)
                pipe.execute_command("EVALSHA", sha(detail.source), len(detail.keys), *detail.keys, *detail.args)
                yield "script", [index]
        yield from self._queue_steps(pipe, target, plans, waiting)

    def _queue_steps(
        self, pipe: Any, target: str, plans: list[tuple[str, Call | Exception | None]], indexes: list[int]
    ) -> Iterator[tuple[str, list[int]]]:
        """Queue batch steps for ``indexes``: per slot on a cluster, at most :data:`STEP_OPS` each."""
        groups: dict[int, list[tuple[int, Call]]] = {}
        cluster = self.clients.is_cluster(target)
        for index in indexes:
            call = plans[index][1]
            assert isinstance(call, Call)
            groups.setdefault(slot_of(call.keys[0]) if cluster else 0, []).append((index, call))
        apply_sha = sha(APPLY)
        for group in groups.values():
            for first in range(0, len(group), STEP_OPS):
                part = group[first:first + STEP_OPS]
                calls = [call for _, call in part]
                pipe.execute_command("EVALSHA", apply_sha, 1, calls[0].keys[0], packed(calls))
                yield "step", [index for index, _ in part]

    def _step_replies(self, client: Any, calls: list[Call], reply: Any) -> list[Any]:
        """One reply per op of a batch step; a step that failed as a whole is sorted out here."""
        if isinstance(reply, NoScriptError):
            try:
                return self._apply(client, calls)  # loads the script, then runs the step
            except ResponseError as exc:
                reply = exc
        if not isinstance(reply, Exception):
            return list(reply)
        if policy.is_retryable(reply):
            return [reply] * len(calls)  # refused before it ran (OOM, READONLY, LOADING...)
        # The script stopped part way (an op's own error): the ops before it were applied.
        # Each op runs again on its own; markers and stamps make that harmless.
        return [_RUN_ALONE] * len(calls)

    def _result(self, op: RedisOp, mode: str, detail: Call | Exception | None, replies: list[Any]) -> ReplayResult:
        if isinstance(detail, Exception):
            raise detail
        if mode == "per_slot" or (replies and replies[0] is _RUN_ALONE):
            return self.run(op)
        if mode == "plain":
            return plain_outcome(op, replies)
        if isinstance(replies[0], NoScriptError):
            return self.run(op)  # loads the script, then runs the op
        if isinstance(replies[0], Exception):
            raise replies[0]
        assert isinstance(detail, Call)
        return _lua_outcome(op, detail, replies[0])

    # -- building Lua steps --------------------------------------------------------------

    def _call(self, op: RedisOp) -> Call:
        if op.kind == "script":
            name = op.script or ""
            source = self.settings.scripts.get(name)
            if source is None:
                raise UnknownScriptError(f"script {name!r} is not registered in redis_retry_scripts")
            return Call(
                f"user:{name}", wrap_user_script(source), [*op.keys, marker_key(op)],
                [*op.args, self._marker_ttl_ms(op)], 1,
            )
        return self._once_call(op, op.commands, marker_key(op) if _needs_marker(op) else None)

    def _once_call(self, op: RedisOp, commands: tuple[Command, ...], marker: bytes | None) -> Call:
        guard = op.guard
        guard_key: Arg | None = None
        condition: list[Arg] = _NO_GUARD
        if guard is not None:
            guard_key = guard.key
            expected = guard.expected if guard.kind == "value" else guard.version
            condition = strings([guard.kind, "" if guard.field is None else guard.field,
                                  "" if expected is None else expected])
            guard_key = strings([guard_key])[0]
        commands = tuple([strings(command) for command in commands])  # type: ignore[misc]
        if max(map(len, commands)) > LUA_MAX_ARGS:
            command = max(commands, key=len)
            raise PermanentReplayError(
                f"{command[0]!s} has {len(command)} arguments: too many to apply atomically "
                f"(at most {LUA_MAX_ARGS}); split the op",
                reason="too_large",
            )
        keys, argv = stamps.step(
            commands,
            mode="t" if op.transaction else "r",
            stamp=stamps.stamp_of(op.created_at) if self.settings.write_stamps else None,
            stamp_ttl=self._stamp_ttl_ms,
            marker=marker,
            marker_ttl=self._marker_ttl_ms(op),
            guard=condition,
            guard_key=guard_key,
        )
        return Call("apply_once", APPLY, keys, argv, len(commands))

    def _marker_ttl_ms(self, op: RedisOp) -> int:
        retries = self.settings.max_retries if op.max_retries is None else op.max_retries
        ttl = self._marker_ttls.get(retries)
        if ttl is None:
            ttl = self._marker_ttls[retries] = self.settings.marker_ttl_ms(retries)
        return ttl

    def _script(self, client: Any, name: str, source: str) -> Any:
        # redis-py's Script handles NOSCRIPT itself: SCRIPT LOAD, then EVALSHA again.
        key = (id(client), name)
        script = self._scripts.get(key)
        if script is None:
            script = self._scripts[key] = client.register_script(source)
        return script


#: A batch step's reply for an op that must run again on its own.
_RUN_ALONE = object()








def _needs_marker(op: RedisOp) -> bool:
    # Running the op twice must not change the result twice: anything but idempotent
    # commands, and transactions and guarded ops, whose "all or nothing" it protects.
    if op.transaction or op.guard is not None:
        return True
    commands = op.commands
    if len(commands) == 1:
        return not is_idempotent(commands[0])
    return not all(is_idempotent(c) for c in commands)


# -- reading replies ---------------------------------------------------------------------








def _lua_outcome(op: RedisOp, call: Call, reply: Any) -> ReplayResult:
    if call.script != "apply_once":
        return ReplayResult("duplicate" if reply == ALREADY_APPLIED else "applied", (None,))
    return checked(op, parse_once(reply, call.commands))














