"""Step 5's worker side: what ``install(app)`` adds to a Celery app besides the tasks.

The replay queue (``redis_retry_queue``) and the critical one (``redis_retry_critical_queue``),
``worker_eta_task_limit`` for countdown retries, and four worker boot steps: one refuses
to start with bad ``redis_retry_*`` settings (one line, exit 3), one has a worker that
consumes the replay queue consume the critical one too (``-Q redis-retry`` is enough), one
serves Prometheus metrics before the pool forks, and one follows the operators' pauses and
retry policy rules (:mod:`celery_redis_retry.control`) in every process that runs tasks, so
that ops of a paused target are parked untried and every attempt follows the rules in force.
install() imports :mod:`celery_redis_retry.tasks`, which registers the tasks.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import click
from celery import bootsteps, signals
from celery.bin.base import CeleryCommandException
from celery.signals import after_setup_logger, after_setup_task_logger
from kombu.entity import Queue

from celery_redis_retry.config import Settings, pending_settings, settings_for
from celery_redis_retry.control import ControlWatch, TargetPause
from celery_redis_retry.errors import (
    ConfigurationError,
    SettingsRefusedError,
)
from celery_redis_retry.logs import use_format
from celery_redis_retry.metrics import serve_worker_metrics
from celery_redis_retry.names import EXIT_CONFIG
from celery_redis_retry.retry_policy import PolicyRules

logger = logging.getLogger(__name__)


# Not in errors.py: Celery's command line prints a ClickException's message alone and exits
# with its code, so this must derive from Celery's CeleryCommandException; errors.py cannot
# import Celery or click (every process imports it, the application's hot path too).
class _WorkerSettingsRefused(CeleryCommandException, SettingsRefusedError):
    """The :class:`SettingsRefusedError` ``celery worker`` shows in one line, exiting 3."""

    def __init__(self, error: ConfigurationError) -> None:
        CeleryCommandException.__init__(self, f"celery_redis_retry: configuration error: {error}", EXIT_CONFIG)

    def show(self, file: Any = None) -> None:
        click.echo(self.message, file=file, err=True)


class _ValidateSettings(bootsteps.Step):
    """Worker boot step: refuse to start with bad ``redis_retry_*`` settings."""

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        with _refused_in_one_line():
            settings_for(worker.app)
        super().__init__(worker, **kwargs)


@contextlib.contextmanager
def _refused_in_one_line() -> Iterator[None]:
    """Turn a :class:`ConfigurationError` of a boot step into :class:`SettingsRefusedError`:
    Celery's command line shows a ClickException as its message, without a traceback."""
    try:
        yield
    except SettingsRefusedError:
        raise
    except ConfigurationError as exc:
        raise _WorkerSettingsRefused(exc) from exc


class _ConsumeCriticalQueue(bootsteps.Step):
    """Worker boot step: a worker that consumes the replay queue consumes the critical queue too.

    Critical ops are handed over in ``redis_retry_critical_queue``; a worker started with
    ``-Q redis-retry`` must take them without its command line naming that queue. It runs
    after the worker selected its queues (``-Q``) and before its consumer starts.
    """

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        with _refused_in_one_line():
            settings = settings_for(worker.app)
        queues = worker.app.amqp.queues
        consumed = queues.consume_from
        if settings.queue in consumed and settings.critical_queue not in consumed:
            queues.select_add(settings.critical_queue)
            logger.info("consuming %s too: critical ops of %s", settings.critical_queue, settings.queue)
        super().__init__(worker, **kwargs)


class _ServeMetrics(bootsteps.Step):
    """Worker boot step: serve replay outcomes on ``redis_retry_worker_metrics_port``.

    It runs in the main process before the pool forks, so every child counts into the
    shared memory it creates. A port in use stops the worker, in one line.
    """

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        with _refused_in_one_line():
            port = settings_for(worker.app).worker_metrics_port
            if port is not None:
                serve_worker_metrics(port)
                logger.info("serving Prometheus metrics on :%d/metrics", port)
        super().__init__(worker, **kwargs)


#: This process's follower of the control topic (None: not a worker, or not started yet).
_control: ControlWatch | None = None
#: How long a task waits, once per process, for the control topic to be read to its end.
PAUSES_READ_WAIT = 10.0


def _ready_watch() -> ControlWatch | None:
    watch = _control
    if watch is not None:
        watch.wait_ready(PAUSES_READ_WAIT)  # at once, but for the first tasks after a start
    return watch


def current_pause(target: str) -> TargetPause | None:
    """``target``'s pause if an operator paused it, as this worker process follows the control topic."""
    watch = _ready_watch()
    return None if watch is None else watch.pause_of(target)


def current_rules(settings: Settings) -> PolicyRules:
    """The retry policy rules in force, as this worker process follows the control topic.

    Outside a worker (no follower), none: ``settings`` alone decide.
    """
    watch = _ready_watch()
    return PolicyRules.of((), settings) if watch is None else watch.rules()


def _follow_pauses(settings: Settings) -> None:
    global _control  # one follower per process, as one Kafka client per process
    _control = ControlWatch(settings).start()


class _FollowPauses(bootsteps.Step):
    """Worker boot step: follow the control topic (pauses, retry policy rules) in each process that runs tasks.

    A thread does not survive a fork, nor may a forked child use its parent's Kafka
    client: with the prefork pool each child starts its own follower when it starts.
    """

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        with _refused_in_one_line():
            settings = settings_for(worker.app)
        if str(getattr(worker.pool_cls, "__module__", "")).endswith(".prefork"):
            signals.worker_process_init.connect(lambda **_: _follow_pauses(settings), weak=False)
        else:
            _follow_pauses(settings)
        super().__init__(worker, **kwargs)


def attach(app: Any) -> None:
    """Add the queue and start-up validation to ``app`` (see ``install``).

    The tasks themselves are shared tasks: importing this module registered them on
    every Celery app, finalized or not. The settings are read and checked at once (bad
    ones raise :class:`ConfigurationError`), except inside the ``celery`` command line,
    where the command reports them (see :func:`_celery_command`).
    """
    for step in (_ValidateSettings, _ConsumeCriticalQueue, _ServeMetrics, _FollowPauses):
        if step not in app.steps["worker"]:
            app.steps["worker"].add(step)
    install_worker_logging(app)
    command = _celery_command()
    if app.configured:
        try:
            _add_queue(app, settings_for(app))
        except ConfigurationError:
            if not command:
                raise
        return

    def on_configured(**_: Any) -> None:
        try:
            settings = settings_for(app)
        except ConfigurationError:
            return  # raised to whoever reads the settings: install(), a boot step, the bridge, a capture
        _add_queue(app, settings)

    # What the app sets after install() (task_queues...) still counts: the queue is added
    # when Celery loads the configuration.
    app.on_after_configure.connect(on_configured, weak=False)
    if not command:
        _check_given_settings(app)


def install_worker_logging(app: Any) -> None:
    """Have Celery's worker and task loggers write ``app``'s ``redis_retry_log_format``.

    Connected when the app is installed; read when Celery sets its loggers up (in the
    worker, before its boot steps), so settings given after ``install()`` count. Bad
    settings leave the loggers as they are: the worker's boot step reports them.
    """

    def formatted(logger: logging.Logger, **_: Any) -> None:
        try:
            log_format = settings_for(app).log_format
        except ConfigurationError:
            return
        use_format(log_format, logger)

    after_setup_logger.connect(formatted, weak=False)
    after_setup_task_logger.connect(formatted, weak=False)


def _add_queue(app: Any, settings: Settings) -> None:
    if app.conf.worker_eta_task_limit is None:
        # Countdown tasks are held by the worker, unacknowledged, until due; without a
        # limit a burst of retries raises the prefetch count without bound (celery #9849).
        app.conf.worker_eta_task_limit = settings.max_countdown_tasks
    queues = app.conf.task_queues
    # Without an explicit task_queues, Celery creates queues on demand (-Q redis-retry).
    if queues is not None:
        names = {q.name for q in queues}
        missing = [name for name in (settings.queue, settings.critical_queue) if name not in names]
        app.conf.task_queues = [*queues, *(Queue(name, routing_key=name) for name in missing)]  # type: ignore[no-untyped-call]


def lane_queue(app: Any, delivery_info: Mapping[str, Any] | None) -> str:
    """The queue of the lane a task came in: the critical queue, or else the replay queue.

    A replay task sent again (a batch's op retried on its own) goes back in its lane, so
    that a critical op stays ahead and an op put behind another of its key stays behind it.
    The task's routing key tells: the critical queue's name, or the routing key an app's
    own ``task_queues`` gives that queue.
    """
    settings = settings_for(app)
    routing_key = (delivery_info or {}).get("routing_key")
    if routing_key == settings.critical_queue:
        return settings.critical_queue
    declared = app.amqp.queues.get(settings.critical_queue)
    if routing_key is not None and declared is not None and routing_key == declared.routing_key:
        return settings.critical_queue
    return settings.queue


def _check_given_settings(app: Any) -> None:
    """Check the settings of an app not configured yet, as far as they are given.

    A configuration source given before ``install()`` (``config_from_object``) is loaded
    now. Keys set with ``app.conf.update(...)`` are checked without loading the
    configuration, so that what the app sets after ``install()`` still counts. Before
    either there is nothing to check; Celery's configuration hook cannot raise (Celery
    logs what a hook raises), so then the first use of the settings raises.
    """
    if getattr(app, "_config_source", None) is not None:
        settings_for(app)
    elif (given := pending_settings(app)) is not None:
        Settings.from_mapping(given)


def _celery_command() -> bool:
    """Whether the ``celery`` command line is loading the app (``celery -A app worker``...).

    An error raised while it imports the app module is printed with a traceback, so
    there the settings are reported by the command itself (the worker's boot step, the
    ``redis-retry`` commands), in one line.
    """
    context = click.get_current_context(silent=True)
    cli = sys.modules.get("celery.bin.celery")  # imported already when the command line runs
    return context is not None and cli is not None and context.find_root().command is getattr(cli, "celery", None)
