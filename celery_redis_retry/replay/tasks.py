"""Steps 5 and 7 of the flow: the Celery tasks that replay ops and dead-letter them.

``celery_redis_retry.replay`` runs one op on its target Redis. An outage of the target
(refused, timed out, LOADING, READONLY...: :func:`~celery_redis_retry.policy.is_outage`)
is not the op's fault: the op is parked in the target's waiting topic in Kafka, spends no
attempt, and the task ends (``waiting``); the bridge hands it over again once the target
is back. Any other retryable Redis error reschedules it with ``self.retry(countdown=...)``
(never a sleep inside the task); a permanent one, or the last failed attempt, makes the task
fail with a :class:`~celery_redis_retry.errors.ReplayError` whose ``reason`` says why. The
bridge attaches ``celery_redis_retry.dead_letter`` as the error callback (``link_error``):
Celery calls it in the worker with the failed request, and it writes the DLQ record.

Task names travel inside messages: they never change. Listing this module in a Celery
app's ``include`` registers both tasks; :func:`celery_redis_retry.install` also adds the
queue and start-up validation.
"""

from __future__ import annotations

import logging
import os
import time
import traceback as traceback_module
import weakref
from collections import Counter
from collections.abc import Sequence
from typing import Any

from celery import shared_task, signals

from celery_redis_retry import policy
from celery_redis_retry.bridge.circuits import LocalCircuit
from celery_redis_retry.bridge.ends import EndsWriter, Position, position
from celery_redis_retry.bridge.waiting import WORKER_PARK_HOLD, Parked, WaitingWriter
from celery_redis_retry.config import Settings, settings_for
from celery_redis_retry.dlq.record import DeadLetterWriter, Origin, letter_for_failure
from celery_redis_retry.errors import (
    DecodeError,
    PublishError,
    ReplayError,
)
from celery_redis_retry.expiry import ends_expired
from celery_redis_retry.logs import op_fields
from celery_redis_retry.message import Reader
from celery_redis_retry.metrics import count_outcomes
from celery_redis_retry.names import AT_ORIGINS, DEAD_LETTER_TASK, REPLAY_BATCH_TASK, REPLAY_TASK
from celery_redis_retry.ops import RedisOp
from celery_redis_retry.replay.executor import Executor
from celery_redis_retry.replay.outcomes import ReplayResult, final_error
from celery_redis_retry.replay.reporting import report_outcome
from celery_redis_retry.replay.worker import current_pause, current_rules, lane_queue
from celery_redis_retry.retry_policy import Decision

logger = logging.getLogger(__name__)


# Origins stay in their wire form (Origin.from_wire) until an op needs one: most never do.
_Item = tuple[str, Any, RedisOp, Any]  # one op of a batch: message, origin, op, position
_Retry = tuple[str, Any, RedisOp, Any, int]  # ..., and how many outages it met
_Ended = tuple[str, Any, BaseException, Any]  # message, origin, what ended it, position


class _Runtime:
    """Per app and per process: the executor (Redis pools) and the DLQ writer."""

    def __init__(self, settings: Settings) -> None:
        self.pid = os.getpid()
        self.settings = settings
        self.reader = Reader(settings)
        self.executor = Executor(settings)
        self.dlq = DeadLetterWriter(settings)
        self.circuit = LocalCircuit(paused=current_pause)  # a paused target is held as one that failed
        self.waiting = WaitingWriter(settings, parked_by="worker")
        self.ends = EndsWriter(settings)

    def decide(self, op: RedisOp) -> Decision:
        """``op``'s retry limit, backoff and deadline now: the retry policy rules in force, then the op and settings.

        Asked at every attempt, so that ops in flight follow a rule set after their capture.
        """
        return current_rules(self.settings).decide(op)

    def expired(self, op: RedisOp, decision: Decision) -> bool:
        """Whether ``op`` is past its deadline or ``redis_retry_max_age`` (logged with why)."""
        return ends_expired(op, self.settings.max_age, decision)

    def park(self, items: list[Parked], reason: str) -> bool:
        """Park ops of one target in its waiting topic; False when Kafka did not confirm them."""
        try:
            self.waiting.park(items[0].op.target, items, reason, hold=WORKER_PARK_HOLD)
        except PublishError as exc:
            logger.warning("could not park %d ops for target %r in Kafka (%s): Celery retries them",
                           len(items), items[0].op.target, exc)
            return False
        logger.info("%d ops for target %r parked in %s: %s", len(items), items[0].op.target,
                    self.settings.waiting_topic(items[0].op.target), reason)
        return True


_runtimes: weakref.WeakKeyDictionary[Any, _Runtime] = weakref.WeakKeyDictionary()


def runtime(app: Any) -> _Runtime:
    """The :class:`_Runtime` of ``app`` in this process (rebuilt after a fork)."""
    current = _runtimes.get(app)
    if current is None or current.pid != os.getpid():
        current = _runtimes[app] = _Runtime(settings_for(app))
    return current


_TASK_OPTIONS: dict[str, Any] = {
    "bind": True,
    "acks_late": True,  # a worker killed mid-replay leaves the message to be delivered again...
    "reject_on_worker_lost": True,  # ...and the dedupe markers make that second run harmless
    "ignore_result": True,
    "max_retries": None,  # each op carries its own limit, checked by final_error()
    # Expected failures are logged by Celery at INFO, without a traceback; the DLQ has it.
    "throws": (ReplayError, DecodeError),
}


@shared_task(name=REPLAY_TASK, **_TASK_OPTIONS)
def replay(
    self: Any, message: str, origin: dict[str, Any] | None = None, outages: int = 0, position: Any = None
) -> str:
    """Run the op in ``message`` (wire format v1) on its target; return its outcome.

    Outcomes: ``applied``, ``duplicate`` (a dedupe marker shows it was applied before),
    ``superseded`` (its guard failed), ``expired``, or ``waiting`` (its target is down:
    parked in Kafka until it is back). Raises :class:`~celery.exceptions.Retry` for a
    retryable Redis error of the op while attempts remain, else a
    :class:`~celery_redis_retry.errors.ReplayError` (the error callback then writes the
    DLQ record). ``outages`` counts the retries that were outages (Kafka could not take
    the op to park it): they are not the op's attempts. ``position`` is where the bridge
    read the message: the op's end is reported to the bridges for it.
    """
    rt = runtime(self.app)
    here = position_of(position)
    op = rt.reader.read(message)  # as the bridge did: the Celery broker is a boundary too
    decision = rt.decide(op)
    if rt.expired(op, decision):
        count_outcomes({"expired": 1})
        rt.ends.report([here], outcomes={"expired": 1})
        return "expired"
    spent = op.attempt + self.request.retries - outages
    outage: BaseException | None = None
    if rt.circuit.is_open(op.target):
        outage = rt.circuit.skipped(op.target)
    else:
        try:
            started = time.time_ns()
            result = rt.executor.run(op)
        except Exception as exc:
            if not policy.is_outage(exc):
                limit = decision.max_retries
                error = final_error(op, exc, spent, limit)
                if error is not None:
                    raise error from exc
                countdown = decision.countdown(spent)
                logger.info("op %s attempt %d/%d failed (%s); retrying in %.2f s", op.id, spent + 1, limit + 1,
                            type(exc).__name__, countdown, extra=op_fields(op, "retrying"))
                count_outcomes({"retrying": 1})
                # Before: retry() raises. Should the broker refuse it, the op is only due later.
                rt.ends.report((), [(here, time.time() + countdown)])
                raise self.retry(countdown=countdown, exc=exc) from exc
            rt.circuit.opened(op.target)
            outage = exc
        else:
            report_outcome(op, result.outcome, started)
            count_outcomes({result.outcome: 1})
            rt.ends.report([here], outcomes={result.outcome: 1})
            return result.outcome
    parked = Parked(message.encode(), op, Origin.from_wire(origin), attempts=spent)
    if rt.park([parked], f"{type(outage).__name__}: {outage}"):
        count_outcomes({"waiting": 1})
        rt.ends.report([here], outcomes={"waiting": 1})  # the waiting topic holds it now
        return "waiting"
    # Kafka cannot take it either: Celery holds it, and that attempt is not the op's.
    countdown = rt.settings.backoff.countdown(min(outages, 10))
    rt.ends.report((), [(here, time.time() + countdown)])
    raise self.retry(countdown=countdown, exc=outage,
                     kwargs={"origin": origin, "outages": outages + 1, "position": position})


@shared_task(name=REPLAY_BATCH_TASK, **_TASK_OPTIONS)
def replay_batch(
    self: Any, messages: list[str], origins: list[list[Any]], positions: list[Any] | str | None = None
) -> dict[str, int]:
    """Run many ops in pipelined round trips; return how many ended in each outcome.

    An op that fails falls back to its own path: an outage of its target parks it in
    Kafka (``waiting``); another retryable error sends it as a ``replay`` task that
    continues with its next attempt after the usual countdown; anything that ends it is
    dead-lettered here, with its own DLQ record, exactly as ``replay`` would have.
    ``positions`` are where the bridge read each message (:data:`AT_ORIGINS`: at their
    origins); the ops' ends are reported to the bridges for them, once per batch.
    """
    rt = runtime(self.app)
    outcomes: Counter[str] = Counter()
    ready: dict[str, list[_Item]] = {}
    ended: list[_Ended] = []
    done: list[Position | None] = []  # ops that ended here (the DLQ'd ones once written)
    for message, origin, where in zip(messages, origins, _positions(positions, origins), strict=True):
        here = position_of(where)
        try:
            op = rt.reader.read(message)
        except DecodeError as exc:
            ended.append((message, origin, exc, here))
            continue
        if rt.expired(op, rt.decide(op)):
            outcomes["expired"] += 1
            done.append(here)
            continue
        ready.setdefault(op.target, []).append((message, origin, op, here))

    retry_later: list[_Retry] = []
    for target, items in ready.items():
        _run_target(rt, target, items, outcomes=outcomes, ended=ended, retry_later=retry_later, done=done)

    # Fallbacks first: if the Celery broker refuses them, retrying this whole batch is
    # safe (markers), while DLQ records written before would be written twice.
    errback = self.app.signature(DEAD_LETTER_TASK)
    due: list[tuple[Position | None, float]] = []
    for message, origin, op, here, outages in retry_later:
        countdown = rt.settings.backoff.countdown(0) if outages else rt.decide(op).countdown(op.attempt)
        self.app.send_task(
            REPLAY_TASK, args=(message,),
            kwargs={"origin": _document(Origin.from_wire(origin)), "outages": outages, "position": _listed(here)},
            queue=lane_queue(self.app, self.request.delivery_info), link_error=errback, retries=1,
            countdown=countdown,
        )
        due.append((here, time.time() + countdown))
    outcomes["retrying"] += len(retry_later)
    rt.ends.report(done, due, {k: n for k, n in outcomes.items() if k != "retrying"})
    for message, origin, error, here in ended:
        _write_dead_letter(
            rt, message, Origin.from_wire(origin), error, traceback=_traceback_of(error), attempts=1,
            task_id=self.request.id, position=here,
        )
        outcomes["rejected" if isinstance(error, DecodeError) else "dead"] += 1
    count_outcomes({k: n for k, n in outcomes.items() if k not in ("dead", "rejected")})  # see _write_dead_letter
    return dict(outcomes)


def _run_target(
    rt: _Runtime, target: str, items: list[_Item], *, outcomes: Counter[str],
    ended: list[_Ended], retry_later: list[_Retry],
    done: list[Position | None],
) -> None:
    """Run one target's ops of a batch in one round trip; sort each op by what happened to it."""
    to_park: list[_Item] = []
    outage: BaseException | None = None
    results: list[ReplayResult | Exception] = []
    skipped = rt.circuit.is_open(target)
    if skipped:
        to_park, outage = list(items), rt.circuit.skipped(target)
    else:
        try:
            started = time.time_ns()
            results = rt.executor.run_many([op for _, _, op, _ in items])
        except Exception as exc:  # noqa: BLE001 - the round trip failed: every op falls back
            results = [exc] * len(items)
    for (message, origin, op, here), result in zip(items, results, strict=False):
        if isinstance(result, ReplayResult):
            outcomes[result.outcome] += 1
            report_outcome(op, result.outcome, started)
            done.append(here)
        elif policy.is_outage(result):
            to_park.append((message, origin, op, here))
            outage = result
        else:
            error = final_error(op, result, op.attempt, rt.decide(op).max_retries)
            if error is None:
                retry_later.append((message, origin, op, here, 0))
            else:
                ended.append((message, origin, error, here))
    if to_park:
        if not skipped:
            # Only an outage met here holds the target: ops parked untried must not extend
            # the hold, or under a steady flow it would never end and nothing would be tried.
            rt.circuit.opened(target)
        _park(rt, to_park, outage, outcomes=outcomes, retry_later=retry_later, done=done)


def _park(
    rt: _Runtime, to_park: list[_Item], outage: BaseException | None, *, outcomes: Counter[str],
    retry_later: list[_Retry], done: list[Position | None],
) -> None:
    """Park ops of one target in its waiting topic; if Kafka cannot take them, Celery retries them."""
    parked = [Parked(m.encode(), op, Origin.from_wire(o), attempts=op.attempt) for m, o, op, _ in to_park]
    if rt.park(parked, f"{type(outage).__name__}: {outage}"):
        outcomes["waiting"] += len(to_park)
        done.extend(here for _, _, _, here in to_park)  # the waiting topic holds them now
    else:
        retry_later += [(m, o, op, here, 1) for m, o, op, here in to_park]


def _positions(positions: list[Any] | str | None, origins: list[Any]) -> list[Any]:
    """A batch's positions, one per op (None each when its bridge commits at hand-over)."""
    if positions == AT_ORIGINS:
        return origins
    return positions if isinstance(positions, list) and positions else [None] * len(origins)


def _document(origin: Origin | None) -> dict[str, str | int] | None:
    # The object form: workers of earlier releases read replay's origin as one.
    return None if origin is None else origin.to_document()


def position_of(value: Any) -> Position | None:
    """The position a task was given, or None (a bridge that commits at hand-over gives none)."""
    return position(value) if value is not None else None


def _listed(here: Position | None) -> list[Any] | None:
    return None if here is None else list(here)


def _traceback_of(exc: BaseException) -> str:
    return "".join(traceback_module.format_exception(exc))


def _write_dead_letter(
    rt: _Runtime, message: str | bytes, origin: Origin | None, exc: BaseException, *, traceback: str,
    attempts: int, task_id: str | None, position: Position | None = None,
) -> None:
    letter, key = letter_for_failure(
        message, exc, origin=origin, traceback=traceback, attempts=attempts, task_id=task_id, reader=rt.reader,
    )
    rt.dlq.write(letter, key)  # raises unless Kafka confirmed it: only then has the op ended
    count_outcomes({letter.outcome: 1})
    rt.ends.report([position], outcomes={letter.outcome: 1})


@shared_task(name=DEAD_LETTER_TASK, ignore_result=True)
def dead_letter(request: Any, exc: BaseException, traceback: str | None = None) -> None:
    """Error callback of the replay tasks: write exactly one DLQ record per failed op.

    Celery calls it in the worker that ran the task, with the task's request (its
    arguments, retries and id), the exception and the formatted traceback. For a
    failed ``replay_batch`` (which handles its ops' own failures, so this means
    something unexpected), every op of the batch gets a record.
    """
    from celery import current_app

    rt = runtime(current_app._get_current_object())
    args: Sequence[Any] = request.args or ()
    if request.task == REPLAY_BATCH_TASK and len(args) in (2, 3):
        positions = _positions(args[2] if len(args) == 3 else None, args[1])
        for message, origin, where in zip(args[0], args[1], positions, strict=True):
            _write_dead_letter(
                rt, message, Origin.from_wire(origin), exc, traceback=traceback or "", attempts=1, task_id=request.id,
                position=position_of(where),
            )
        return
    kwargs = request.kwargs or {}
    _write_dead_letter(
        rt, args[0] if args else "", Origin.from_wire(kwargs.get("origin") or None), exc, traceback=traceback or "",
        attempts=(request.retries or 0) + 1, task_id=request.id, position=position_of(kwargs.get("position")),
    )


@signals.worker_process_shutdown.connect
def _close_producers(**_: Any) -> None:
    # A prefork child is going away: flush what tasks published, spool the rest.
    from celery_redis_retry.capture.producer import close_all

    close_all(timeout=10.0)
    for rt in list(_runtimes.values()):
        rt.ends.close(timeout=5.0)
