"""``celery -A proj redis-retry status``: where every op waiting for replay stands.

One look at each place an op can wait, from the first to the last:

- the local spool of this host (ops Kafka could not take yet);
- the retry topic, as the bridges' consumer group sees it (lag: ops not yet handed over);
- the Celery queue (replay tasks waiting for a worker);
- the workers (replay tasks they hold until the countdown of their next attempt, as
  Celery's ``inspect scheduled`` reports them);
- the dead-letter topic (records past the operator cursor, see :mod:`.dlq_admin`);
- each target: its circuit (a probe), whether an operator paused it (the control
  topic), and the ops in its waiting topic;
- the retry policy rules in force (the control topic), in the order they are tried.

Every figure is read, not estimated; a place that cannot be reached is reported as such
(``error``) rather than as zero, and so is a topic that does not exist (``missing_topics``:
on a cluster that does not create topics on use, nothing can wait there).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery_redis_retry import kafka
from celery_redis_retry.bridge.dispatch import TaskSender
from celery_redis_retry.cli.policy import ordered_records, record_line
from celery_redis_retry.cli.target import paused_document, paused_line
from celery_redis_retry.config import Settings, waiting_group
from celery_redis_retry.control import TargetPause, read_control
from celery_redis_retry.dlq.admin import DeadLetterQueue


@dataclass(frozen=True)
class TargetStatus:
    """One target: can it take writes now (a probe, as the bridges make), and how many ops wait for it."""

    name: str
    circuit: str  # "closed" (takes writes) or "open"
    reason: str  # why it is open ("" when closed)
    waiting: int | None  # ops in its waiting topic the bridges have not handed over (None: unknown)
    pause: TargetPause | None = None  # its last control record (None: never paused, or unknown)

    def document(self) -> dict[str, Any]:
        return {"circuit": self.circuit, "reason": self.reason, "waiting": self.waiting,
                "pause": paused_document(self.pause)}


@dataclass(frozen=True)
class Retrying:
    """Ops the workers hold until their next attempt (a retry's countdown), from Celery's remote control."""

    ops: int | None  # None: no worker answered (none running, or remote control off)
    oldest_age: float | None  # seconds since the oldest of them was captured
    workers: int  # workers that answered

    def document(self) -> dict[str, Any]:
        return {"ops": self.ops, "oldest_age": self.oldest_age, "workers": self.workers}


@dataclass(frozen=True)
class Status:
    """The figures of :func:`collect`, JSON-ready through :meth:`document`."""

    topic: str
    group: str
    partitions: dict[int, kafka.PartitionOffsets] | None
    queue: str
    queued_tasks: int | None
    dlq_topic: str
    dlq_pending: int | None
    spool_path: str
    spool_messages: int
    spool_oldest_age: float | None
    errors: dict[str, str]
    #: The retry or DLQ topic, when the cluster says it does not exist.
    missing_topics: list[kafka.TopicMissingError] = field(default_factory=list)
    targets: list[TargetStatus] = field(default_factory=list)
    retrying: Retrying = field(default_factory=lambda: Retrying(None, None, 0))
    #: The retry policy rules in force (PolicyRecord), in the order they are tried.
    rules: list[Any] = field(default_factory=list)

    @property
    def lag(self) -> int | None:
        """Ops in the retry topic that the bridges have not handed over yet."""
        return None if self.partitions is None else sum(p.lag for p in self.partitions.values())

    @property
    def not_ended(self) -> int | None:
        """Ops in the retry topic that have not ended (committing after end): the lag, less
        the ops past the committed offsets that ended already."""
        return None if self.partitions is None else sum(p.pending for p in self.partitions.values())

    @property
    def healthy(self) -> bool:
        """Every place could be read, and both topics exist."""
        return not self.errors and not self.missing_topics

    def document(self) -> dict[str, Any]:
        """The status as a JSON-ready dict (``status --json``)."""
        return {
            "topic": self.topic,
            "group": self.group,
            "lag": self.lag,
            "not_ended": self.not_ended,
            "partitions": None if self.partitions is None else {
                str(p): {"low": o.low, "high": o.high, "committed": o.committed if o.committed >= 0 else None,
                         "lag": o.lag, "not_ended": o.pending}
                for p, o in sorted(self.partitions.items())
            },
            "queue": self.queue,
            "queued_tasks": self.queued_tasks,
            "retrying": self.retrying.document(),
            "dlq_topic": self.dlq_topic,
            "dlq_pending": self.dlq_pending,
            "spool": {"path": self.spool_path, "messages": self.spool_messages, "oldest_age": self.spool_oldest_age},
            "errors": self.errors,
            "missing_topics": [m.topic for m in self.missing_topics],
            "targets": {t.name: t.document() for t in self.targets},
            "rules": [record.document() for record in self.rules],
        }


def collect(app: Any, settings: Settings, *, timeout: float = 10.0) -> Status:
    """Read every figure of :class:`Status`; unreachable places go to ``errors``."""
    from celery_redis_retry.capture.spool import Spool

    errors: dict[str, str] = {}
    missing: list[kafka.TopicMissingError] = []
    partitions: dict[int, kafka.PartitionOffsets] | None = None
    dlq_pending: int | None = None
    try:
        try:
            partitions = kafka.group_offsets(
                settings.kafka, settings.topic, settings.consumer_group, timeout=timeout, must_exist=True
            )
        except kafka.TopicMissingError as exc:
            exc.role = "retry"
            missing.append(exc)
        try:
            dlq_pending = DeadLetterQueue(settings, timeout=timeout).pending_count()
        except kafka.TopicMissingError as exc:
            exc.role = "DLQ"
            missing.append(exc)
    except kafka.KafkaException as exc:
        errors["kafka"] = kafka.no_answer_message(settings.kafka, timeout) if kafka.did_not_answer(exc) else str(exc)
    sender = TaskSender(app, settings.queue, one_task_per_op=False, critical_queue=settings.critical_queue)
    try:
        queued = sender.queued_tasks()
    finally:
        sender.close()
    if queued is None:
        errors["celery_broker"] = f"cannot read queue {settings.queue!r} on the Celery broker"
        retrying = Retrying(None, None, 0)
    else:
        retrying = _retrying(app, settings, timeout=min(timeout, RETRYING_REPLY_WAIT))
    spool = Spool(settings.spool_path, max_bytes=settings.spool_max_bytes).status()
    pauses: dict[str, TargetPause] = {}
    rules: dict[str, Any] = {}
    if "kafka" not in errors:
        try:
            pauses, rules = read_control(settings, timeout=timeout)
        except kafka.KafkaException as exc:
            errors["control_topic"] = f"cannot read {settings.control_topic}: {exc}"
    targets = [_target_status(settings, name, timeout=timeout, kafka_ok="kafka" not in errors, pause=pauses.get(name))
               for name in settings.targets]
    return Status(
        topic=settings.topic,
        group=settings.consumer_group,
        partitions=partitions,
        queue=settings.queue,
        queued_tasks=queued,
        dlq_topic=settings.dlq_topic,
        dlq_pending=dlq_pending,
        spool_path=str(spool.path),
        spool_messages=spool.messages,
        spool_oldest_age=None if spool.oldest_at is None else time.time() - spool.oldest_at,
        errors=errors,
        missing_topics=missing,
        targets=targets,
        retrying=retrying,
        rules=ordered_records(rules),
    )


#: How long ``status`` waits for the workers to say which replay tasks they hold.
RETRYING_REPLY_WAIT = 1.0


def _retrying(app: Any, settings: Settings, *, timeout: float) -> Retrying:
    """Count the ops in the replay tasks the workers hold for a later attempt, and the oldest one's age.

    A task retried with a countdown is taken by a worker at once and held, unacknowledged,
    until it is due: it is neither in the Celery queue nor in Kafka's lag, and only the
    workers can say it is there.
    """
    from celery_redis_retry.errors import DecodeError
    from celery_redis_retry.message import decode
    from celery_redis_retry.names import REPLAY_BATCH_TASK, REPLAY_TASK

    replies = app.control.inspect(timeout=timeout).scheduled() or {}
    count = 0
    oldest: float | None = None
    for held in replies.values():
        for entry in held or ():
            request = entry.get("request") or {}
            routed = (request.get("delivery_info") or {}).get("routing_key")
            lanes = (None, settings.queue, settings.critical_queue)
            if request.get("name") not in (REPLAY_TASK, REPLAY_BATCH_TASK) or routed not in lanes:
                continue
            args: list[Any] = list(request.get("args") or [])
            if not args:
                continue
            messages = [args[0]] if request.get("name") == REPLAY_TASK else list(args[0])
            for message in messages:
                count += 1
                try:
                    created = decode(str(message).encode(), max_bytes=settings.max_message_bytes,
                                     signer=settings.signer).created_at
                except DecodeError:
                    continue
                oldest = created if oldest is None else min(oldest, created)
    if not replies:
        return Retrying(None, None, 0)
    return Retrying(count, None if oldest is None else max(0.0, time.time() - oldest), len(replies))


def _target_status(
    settings: Settings, name: str, *, timeout: float, kafka_ok: bool, pause: TargetPause | None = None,
) -> TargetStatus:
    from celery_redis_retry import policy
    from celery_redis_retry.bridge.circuits import TargetProbe

    circuit, reason = "closed", ""
    target_probe = TargetProbe(settings.targets[name])
    try:
        target_probe()
    except Exception as exc:  # noqa: BLE001 - reported, as the bridges would see it
        if policy.is_outage(exc):
            circuit, reason = "open", f"{type(exc).__name__}: {exc}"
    finally:
        target_probe.close()
    waiting = None
    if kafka_ok:
        try:
            offsets = kafka.group_offsets(settings.kafka, settings.waiting_topic(name),
                                          waiting_group(settings.consumer_group), timeout=timeout)
            waiting = sum(o.lag for o in offsets.values())
        except kafka.KafkaException:
            waiting = None
    return TargetStatus(name, circuit, reason, waiting, pause)


# -- showing it --------------------------------------------------------------------------


def frame(status: Status, settings: Settings, app: str, *, as_json: bool = False) -> tuple[list[str], list[str]]:
    """The lines ``status`` prints for ``status``: to stdout, and to stderr (what could not be read)."""
    from celery_redis_retry.message import dumps

    if as_json:
        return [dumps(status.document()).decode()], []
    errors = [f"error        {place}: {error}" for place, error in status.errors.items()]
    errors += [f"error        {missing.explain(app)}" for missing in status.missing_topics]
    return _text_lines(status, settings), errors


def _text_lines(status: Status, settings: Settings) -> list[str]:
    from celery_redis_retry.words import counted

    def shown(value: object) -> str:
        return "unknown" if value is None else str(value)

    lines = [
        f"spool        {counted(status.spool_messages, 'message')} in {status.spool_path}",
        f"retry topic  {status.topic}: lag {shown(status.lag)}, not ended {shown(status.not_ended)} "
        f"(group {status.group})",
    ]
    for partition, offsets in sorted((status.partitions or {}).items()):
        committed = "-" if offsets.committed < 0 else offsets.committed
        lines.append(f"  partition {partition}: end {offsets.high}, committed {committed}, "
                     f"lag {offsets.lag}, not ended {offsets.pending}")
    lines += [
        f"celery queue {status.queue}: {counted(status.queued_tasks, 'task')} waiting",
        f"retrying     {_retrying_line(status.retrying)}",
        f"dlq          {status.dlq_topic}: {counted(status.dlq_pending, 'record')} pending",
    ]
    for target in status.targets:
        why = f" ({target.reason})" if target.reason else ""
        paused = f", {paused_line(target.pause)}" if target.pause is not None and target.pause.paused else ""
        lines.append(f"target       {target.name}: circuit {target.circuit}{why}{paused}, "
                     f"{counted(target.waiting, 'op')} waiting in {settings.waiting_topic(target.name)}")
    lines += [f"rule         {record_line(record)}" for record in status.rules]
    return lines


def _retrying_line(retrying: Retrying) -> str:
    from celery_redis_retry.words import counted

    if retrying.ops is None:
        return "unknown: no worker answered (none running, or remote control is off)"
    age = "" if retrying.oldest_age is None else f", the oldest captured {retrying.oldest_age:.0f} s ago"
    return f"{counted(retrying.ops, 'op')} held by {counted(retrying.workers, 'worker')} until their next attempt{age}"


#: Home the cursor and clear the screen: a terminal redraws the frame in place.
_REDRAW = "\x1b[H\x1b[2J"


def watch_frames(next_frame: Callable[[], tuple[list[str], list[str]]], interval: float) -> None:
    """Show ``next_frame()`` every ``interval`` seconds until Ctrl-C (which returns, quietly).

    On a terminal each frame replaces the last; otherwise (a pipe, a file, a log) the
    frames follow one another, separated by a blank line. Ctrl-C ends the watch once the
    frame being read is done: raised inside librdkafka's client set-up, a
    KeyboardInterrupt comes out as another error, with a traceback. A second Ctrl-C
    interrupts at once.
    """
    redraw = sys.stdout.isatty()
    stop = threading.Event()

    def on_sigint(_signum: int, _frame: Any) -> None:
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, on_sigint)
    first = True
    try:
        while not stop.is_set():
            begun = time.monotonic()
            out, err = next_frame()
            stamp = time.strftime("%H:%M:%S")
            text = "\n".join([f"status at {stamp} (every {interval:g} s; Ctrl-C to stop)", *out, *err])
            if redraw:
                sys.stdout.write(_REDRAW + text + "\n")
            else:
                sys.stdout.write(("" if first else "\n") + text + "\n")
            sys.stdout.flush()
            first = False
            stop.wait(max(0.0, interval - (time.monotonic() - begun)))
    except KeyboardInterrupt:
        pass  # the second Ctrl-C
    finally:
        signal.signal(signal.SIGINT, previous)
    if redraw:
        sys.stdout.write("\n")

