"""Step 3 of the flow: hand a captured op to Kafka in microseconds, without losing it.

:class:`RetryProducer` wraps one confluent-kafka producer per process. It is created
lazily on first publish and again in every forked child (Celery prefork, gunicorn), so a
librdkafka handle and its threads are never carried across ``fork()``.

Nothing handed to ``publish`` is dropped (see ``docs/producer-durability.md``):

* while Kafka answers, messages go to librdkafka; only *failed* deliveries come back
  to Python (``delivery.report.only.error``), and they go to the :class:`Spool`;
* when every broker is down, the queue is full or the producer hits a fatal error,
  publishing switches to the spool (``diverting``) and librdkafka's queue is purged
  into it, so nothing waits in memory for a broker that is not there;
* a background thread serves delivery reports, probes Kafka while diverting, drains
  the spool in order once Kafka answers, and switches back when it is empty;
* on exit (normal, SIGTERM, Celery's ``worker_process_shutdown``) the producer flushes
  for a bounded time and spools whatever is still undelivered; after SIGTERM or at
  exit, ``publish`` writes straight to the spool.

Two modes: by default ``publish`` returns once librdkafka has the op, so a SIGKILL loses
the ops Kafka has not acknowledged yet: the last few milliseconds while it answers, but
everything since the start of a process that has not connected yet, and up to
``message.timeout.ms`` of ops while a broker hangs without refusing connections. With
``redis_retry_durable_publish`` it returns only once the op is in Kafka or fsynced in
the spool.

A topic that does not exist (a cluster with ``auto.create.topics.enable=false`` where
``redis-retry topics create`` was not run) is an outage like the others: ops go to the
spool until the topic exists, and the producer logs an ERROR naming the topic and the
command that creates it, once a minute, and reports it in :attr:`RetryProducer.topic_missing`
and :meth:`RetryProducer.health`. The background thread looks the topic up when it
starts, so ops do not wait in librdkafka's memory for the 30 s it takes to give up on
an unknown topic (``topic.metadata.propagation.max.ms``); ``publish`` never waits for it.

Kept whole: the producer's state machine (created lazily per process, re-created after
``fork()``, sending, spooling, draining the spool, shutting down at exit and on SIGTERM)
is one set of locks and one set of states; every transition is read in this module. The
spool itself, which stands alone, is :mod:`celery_redis_retry.capture.spool`.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import logging
import os
import signal
import sqlite3
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from celery_redis_retry import kafka
from celery_redis_retry.capture.spool import Spool
from celery_redis_retry.config import Settings, settings_for
from celery_redis_retry.errors import EncodeError, PublishError, SpoolFullError
from celery_redis_retry.message import encode, message_key
from celery_redis_retry.ops import RedisOp
from celery_redis_retry.tracing import with_trace

logger = logging.getLogger(__name__)

_live_producers: weakref.WeakSet[RetryProducer] = weakref.WeakSet()

#: How long ``publish`` waits for Kafka in durable mode before it spools instead.
DURABLE_WAIT = 5.0
#: Messages republished from the spool per batch.
DRAIN_BATCH = 1000
#: Longer than librdkafka's ``message.timeout.ms`` (30 s here): a flush this long gets
#: a delivery report for every message.
DELIVERY_TIMEOUT = 35.0
#: While the topic does not exist: one ERROR line per this many seconds...
MISSING_TOPIC_LOG_INTERVAL = 60.0
#: ...and the cluster is asked again this often (one metadata request each time).
MISSING_TOPIC_RECHECK = 2.0

_CONNECTIVITY_ERRORS = frozenset(
    (kafka.KafkaError._TRANSPORT, kafka.KafkaError._RESOLVE, kafka.KafkaError._ALL_BROKERS_DOWN)
)


@dataclass
class ProducerStats:
    """Counters of one process's producer (read them for metrics)."""

    published: int = 0
    spooled: int = 0
    drained: int = 0
    delivery_failures: int = 0
    spool_full: int = 0
    recreated: int = 0


class _ProcessState:
    """What belongs to one process: the librdkafka handle and its background thread."""

    def __init__(self, owner: RetryProducer) -> None:
        self.pid = os.getpid()
        self.owner = owner
        self.producer = owner._new_kafka_producer()
        # True while ops go to the spool instead of Kafka: Kafka is down, or the spool
        # still holds older ops that must reach Kafka first.
        self.diverting = owner.spool.count() > 0
        self.fatal = False
        self.purge_requested = False
        # Every broker went away: the producer id this handle holds may mean nothing,
        # or someone else's, to the brokers that answer next (see RetryProducer._drain).
        self.stale_producer_id = False
        # Taken around produce() and by close() to mark the handle closed: an op
        # produced after close()'s last flush would stay in a handle nobody flushes.
        self.send_lock = threading.Lock()
        self.closed = False
        self.stopping = threading.Event()
        # Started by RetryProducer._start once this state is in place: librdkafka's
        # callbacks run in this thread and act on the producer's state, and the first
        # ones (ALL_BROKERS_DOWN comes once, within a millisecond when the port refuses)
        # must not find it missing.
        self.thread = threading.Thread(target=owner._background, args=(self,), name="crr-producer", daemon=True)


class RetryProducer:
    """Publishes :class:`~celery_redis_retry.ops.RedisOp` messages to ``redis_retry_topic``.

    ``publish`` validates the op against the settings (target, allowed commands, size),
    encodes and signs it, and hands it to librdkafka, or to the local spool when Kafka
    cannot take it. Safe to share between threads and across ``fork()``.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        kafka_overrides: Mapping[str, Any] | None = None,
        spool: Spool | None = None,
        handle_sigterm: bool = True,
    ) -> None:
        self.settings = settings
        self.durable = settings.durable_publish
        # What publish() reads of the settings for every op, taken once (settings are frozen).
        self._check_op = settings.check_op
        self._topic = settings.topic
        self._max_message_bytes = settings.max_message_bytes
        self.spool = spool or Spool(settings.spool_path, max_bytes=settings.spool_max_bytes, fsync=self.durable)
        self.stats = ProducerStats()
        self._signer = settings.signer
        self._overrides = dict(kafka_overrides or {})
        self._handle_sigterm = handle_sigterm
        self._lock = threading.Lock()
        self._drain_lock = threading.Lock()
        self._state: _ProcessState | None = None
        self._failed_unlogged = 0
        self._failure_logged_at = 0.0
        self._missing_topic: str | None = None
        self._missing_logged_at = 0.0
        self._refusal: str | None = None
        self._refusal_logged_at = 0.0
        _live_producers.add(self)

    @classmethod
    def from_app(cls, app: Any, **kwargs: Any) -> RetryProducer:
        """A producer configured from the ``redis_retry_*`` settings of a Celery app."""
        return cls(settings_for(app), **kwargs)

    # -- state -------------------------------------------------------------------------

    @property
    def topic_missing(self) -> str | None:
        """The topic Kafka says does not exist while ops wait for it in the spool; None otherwise.

        Set when the background thread's lookup or a delivery report says so
        (UNKNOWN_TOPIC_OR_PART); cleared once the topic exists and the spool drains.
        """
        return self._missing_topic

    def health(self) -> dict[str, Any]:
        """A JSON-ready snapshot for a health endpoint.

        ``state`` is ``idle`` (nothing published in this process yet), ``publishing``,
        ``spooling`` (Kafka cannot take ops now; they go to the spool),
        ``topic_missing`` (the topic does not exist: ``topic_missing`` names it) or
        ``refused`` (Kafka refused the credentials or an ACL is missing: ``refusal`` says which).
        """
        state = self._state
        if self._missing_topic is not None:
            mode = "topic_missing"
        elif self._refusal is not None:
            mode = "refused"
        elif state is None:
            mode = "idle"
        else:
            mode = "spooling" if state.diverting else "publishing"
        return {
            "state": mode,
            "topic": self.settings.topic,
            "topic_missing": self._missing_topic,
            "refusal": self._refusal,
            "spool_path": str(self.spool.path),
            "spool_messages": self.spool.count(),
        }

    # -- publishing ----------------------------------------------------------------------

    def publish(self, op: RedisOp) -> str:
        """Hand ``op`` to Kafka (or the spool); return its id.

        Non-blocking by default; in durable mode it returns once the op is in Kafka or
        fsynced in the spool. Raises :class:`~celery_redis_retry.errors.EncodeError`
        (or a subclass) when the op can never be replayed with these settings, and
        :class:`~celery_redis_retry.errors.SpoolFullError` when Kafka cannot take it
        and the spool is full.
        """
        op = with_trace(op)
        self._check_op(op)
        raw = encode(op, self._signer)
        if len(raw) > self._max_message_bytes:
            raise EncodeError(
                f"op {op.id} encodes to {len(raw)} bytes, over redis_retry_max_message_bytes "
                f"({self._max_message_bytes})"
            )
        key = message_key(op)
        state = self._state or self._live_state()
        if state is None or state.diverting or self.durable:
            self._send_elsewhere(state, key, raw)
        else:
            # The common case, spelled out here because every op passes: librdkafka takes
            # it. A with block, not acquire()/try: a Ctrl-C landing between acquire() and
            # try would leave the lock held, and the exit's flush would wait on it forever.
            with state.send_lock:
                if state.closed:
                    reason: str | None = "shutting_down"
                else:
                    try:
                        state.producer.produce(self._topic, raw, key)
                        reason = None
                    except BufferError:
                        logger.warning("librdkafka's queue is full (%d messages): spooling", len(state.producer))
                        state.diverting = True
                        reason = "queue_full"
                    except kafka.KafkaException as exc:
                        logger.error("Kafka producer refused a message (%s): spooling", exc)
                        state.diverting = True
                        state.fatal = state.fatal or exc.args[0].fatal()
                        reason = "producer_error"
            if reason is not None:
                self._to_spool([(self._topic, key, raw)], reason)
        self.stats.published += 1
        return op.id

    async def publish_async(self, op: RedisOp) -> str:
        """:meth:`publish` from a coroutine, never blocking its event loop.

        The common case (librdkafka takes the op) costs a few microseconds and runs
        inline; a publish that may wait (durable mode: Kafka's acknowledgement or an
        fsync; Kafka unavailable: a spool write; the first one: starting the producer)
        runs in a thread and is awaited.
        """
        state = self._state
        if state is None or state.diverting or self.durable:
            return await asyncio.to_thread(self.publish, op)
        return self.publish(op)

    def _send_elsewhere(self, state: _ProcessState | None, key: bytes, value: bytes) -> None:
        """Durable mode, or the process is shutting down (``state`` None), or Kafka cannot take ops now."""
        if self.durable:
            self._send_durable(self._topic, key, value)
        else:
            self._to_spool([(self._topic, key, value)], "shutting_down" if state is None else "kafka_unavailable")

    def _send_durable(self, topic: str, key: bytes, value: bytes) -> None:
        state = self._live_state()
        if state is not None and not state.diverting:
            reports: list[kafka.KafkaError | None] = []
            done = threading.Event()

            def delivered(err: kafka.KafkaError | None, _msg: kafka.Message) -> None:
                reports.append(err)
                done.set()

            produced = False
            with state.send_lock:
                if not state.closed:
                    try:
                        state.producer.produce(topic, value, key, on_delivery=delivered)
                        produced = True
                    except (BufferError, kafka.KafkaException) as exc:
                        logger.warning("Kafka producer refused a message (%s): spooling", exc)
            if produced and done.wait(DURABLE_WAIT) and reports[0] is None:
                return
            # Not confirmed in time: it may still arrive, so it may be in Kafka twice;
            # op ids and dedupe markers make a duplicate harmless.
            state.diverting = True
        self._to_spool([(topic, key, value)], "not_confirmed")

    def _to_spool(self, messages: list[tuple[str, bytes | None, bytes]], reason: str) -> None:
        try:
            self.spool.put_many(messages, reason)
        except SpoolFullError:
            self.stats.spool_full += len(messages)
            raise
        except Exception as exc:
            raise PublishError(f"Kafka cannot take the op and the spool failed: {exc}") from exc
        self.stats.spooled += len(messages)

    # -- per-process librdkafka handle ---------------------------------------------------

    def _live_state(self) -> _ProcessState | None:
        """This process's state, started on first use; None once the process is shutting down.

        After SIGTERM or at exit, a new librdkafka handle would never be flushed: the
        op goes to the spool instead, for the next process to drain.
        """
        state = self._state
        if state is not None:
            return state
        if _shutdown_pid == os.getpid():
            return None
        return self._start()

    def _start(self) -> _ProcessState:
        with self._lock:
            if self._state is None:
                try:
                    self._state = _ProcessState(self)
                except (OSError, sqlite3.Error) as exc:
                    raise PublishError(
                        f"cannot open the spool {self.spool.path} (redis_retry_spool_path): {exc}"
                    ) from exc
                self._state.thread.start()
                if self._handle_sigterm:
                    _install_sigterm_handler()
            return self._state

    def _new_kafka_producer(self) -> kafka.Producer:
        overrides: dict[str, Any] = {
            "on_delivery": self._on_delivery_failure,
            "error_cb": self._on_client_error,
            # Default mode: successes need no Python callback, failures do.
            "delivery.report.only.error": not self.durable,
        }
        if self.durable:
            overrides["linger.ms"] = 0  # each publish waits for its ack: do not add to it
        return kafka.new_producer(self.settings.kafka, **{**overrides, **self._overrides})

    def _on_delivery_failure(self, err: kafka.KafkaError | None, msg: kafka.Message) -> None:
        if err is None:
            return
        self.stats.delivery_failures += 1
        state = self._state
        if state is not None:
            state.diverting = True
        value = msg.value()
        topic = msg.topic()
        if value is None or topic is None:
            return
        try:
            self._to_spool([(topic, msg.key(), value)], f"delivery_failed:{err.name()}")
        except PublishError as exc:
            # The only way an op is lost: Kafka failed it and the spool is full or broken.
            logger.critical("op LOST: Kafka delivery failed (%s) and the spool refused it: %s", err.str(), exc)
        else:
            if err.code() in kafka.UNKNOWN_TOPIC_CODES:
                self._note_topic_missing(topic)  # says it better than the line below
                return
            if err.code() in kafka.AUTHORIZATION_CODES:
                self._note_write_refused(topic, err)
                return
            # A purge can fail 100k deliveries at once: one line per 5 s, with a count.
            self._failed_unlogged += 1
            now = time.monotonic()
            if now - self._failure_logged_at >= 5.0:
                logger.warning(
                    "%d ops not delivered to %s (last: %s): spooled", self._failed_unlogged, topic, err.str()
                )
                self._failed_unlogged, self._failure_logged_at = 0, now

    def _on_client_error(self, err: kafka.KafkaError) -> None:
        state = self._state
        if err.fatal():
            logger.error("Kafka producer fatal error: %s; recreating the producer", err.str())
            if state is not None:
                state.diverting = state.fatal = True
        elif err.code() in kafka.AUTHENTICATION_CODES:
            # Not an outage: nothing changes until someone fixes the settings. Ops waiting
            # in librdkafka's queue go to the spool now rather than after message.timeout.ms.
            if state is not None:
                state.diverting = state.purge_requested = True
            self._note_refusal(kafka.credentials_problem(self.settings.kafka, err.str()))
        elif err.code() == kafka.KafkaError._ALL_BROKERS_DOWN:
            if state is not None and not state.diverting:
                logger.warning("all Kafka brokers are down: new ops go to the spool %s", self.spool.path)
            if state is not None:
                state.diverting = state.purge_requested = state.stale_producer_id = True
        elif err.code() in _CONNECTIVITY_ERRORS:
            # Once per reconnect attempt: librdkafka's own log says when a broker becomes
            # unreachable and when it is back, once (celery_redis_retry.librdkafka).
            logger.debug("Kafka producer: %s", err.str())
        else:
            logger.warning("Kafka producer: %s", err.str())

    # -- background: delivery reports, recovery, draining --------------------------------

    def _background(self, state: _ProcessState) -> None:
        threading.Thread(target=self._check_topic_at_start, args=(state,), name="crr-topic-check",
                         daemon=True).start()
        next_check = time.monotonic() + 5.0
        while not state.stopping.is_set():
            try:
                # poll() itself raises KafkaException on some fatal errors (an idempotent
                # producer refused its producer id): the thread must live on to recreate it.
                state.producer.poll(0.2)
                if state.fatal:
                    self._recreate(state, "after a fatal error")
                elif state.purge_requested:
                    state.purge_requested = False
                    # Ops waiting for a broker that is gone: move them to the spool now.
                    state.producer.purge(in_queue=True, in_flight=False)
                    state.producer.poll(0)
                if state.diverting or time.monotonic() >= next_check:
                    next_check = time.monotonic() + 5.0
                    self._drain(state)
            except kafka.KafkaException as exc:
                if exc.args and getattr(exc.args[0], "fatal", lambda: False)():
                    logger.error("Kafka producer: %s; recreating it", exc.args[0].str())
                    state.diverting = state.fatal = True  # the next step recreates the producer
                else:
                    logger.exception("producer background step failed; retrying")
                    state.stopping.wait(1.0)
            except Exception:
                logger.exception("producer background step failed; retrying")
                state.stopping.wait(1.0)

    def _recreate(self, state: _ProcessState, why: str) -> None:
        with state.send_lock:
            old = state.producer
            old.purge(in_queue=True, in_flight=True)
            state.producer = self._new_kafka_producer()
        _serve_reports(old, 5.0)  # those messages are spooled
        state.fatal = False
        self.stats.recreated += 1
        logger.warning("Kafka producer recreated %s; spooled ops will be resent", why)

    def _note_topic_missing(self, topic: str) -> None:
        """Kafka says ``topic`` does not exist: ops go to the spool; say so once a minute."""
        state = self._state
        if state is not None:
            state.diverting = True
        first = self._missing_topic is None
        self._missing_topic = topic
        now = time.monotonic()
        if first or now - self._missing_logged_at >= MISSING_TOPIC_LOG_INTERVAL:
            self._missing_logged_at = now
            missing = kafka.TopicMissingError(topic, str(self.settings.kafka.get("bootstrap.servers")), role="retry")
            logger.error("%s; until then ops are kept in the spool %s", missing, self.spool.path)

    def _note_refusal(self, problem: str) -> None:
        """Kafka refused our credentials or an ACL is missing: ops go to the spool; say so once a minute."""
        state = self._state
        if state is not None:
            state.diverting = True
        now = time.monotonic()
        if problem != self._refusal or now - self._refusal_logged_at >= MISSING_TOPIC_LOG_INTERVAL:
            self._refusal_logged_at = now
            logger.error("%s; until then ops are kept in the spool %s", problem, self.spool.path)
        self._refusal = problem

    def _note_write_refused(self, topic: str, error: kafka.KafkaError) -> None:
        self._note_refusal(kafka.authorization_problem(self.settings.kafka, topic, "WRITE and DESCRIBE", error.str()))

    def _kafka_ready(self, state: _ProcessState) -> bool:
        """Whether Kafka answers and has the topic: what the spool needs to drain.

        One metadata request; on a broker that creates topics on use it creates it.
        """
        topic = self.settings.topic
        try:
            described = state.producer.list_topics(topic, timeout=2.0).topics.get(topic)
        except kafka.KafkaException:
            state.stopping.wait(1.0)
            return False
        error = None if described is None else described.error
        if described is None or (error is not None and error.code() in kafka.UNKNOWN_TOPIC_CODES):
            self._note_topic_missing(topic)
            state.stopping.wait(MISSING_TOPIC_RECHECK)
            return False
        if error is not None and error.code() in kafka.AUTHORIZATION_CODES:
            self._note_write_refused(topic, error)
            state.stopping.wait(MISSING_TOPIC_RECHECK)
            return False
        if self._refusal is not None:
            logger.warning("Kafka takes ops for %r again: draining the spool %s", topic, self.spool.path)
            self._refusal = None
        if self._missing_topic is not None:
            logger.warning("topic %r exists now: draining the spool %s into it", topic, self.spool.path)
            self._missing_topic = None
        return True

    def _check_topic_at_start(self, state: _ProcessState) -> None:
        # Without this, ops for a missing topic wait 30 s in librdkafka's memory before
        # they fail. It runs in a thread of its own, bounded: publish() never waits for
        # it, and the background thread goes on serving callbacks (ALL_BROKERS_DOWN
        # comes through its poll) while a lookup waits for a broker that is not there.
        topic = self.settings.topic
        try:
            missing = kafka.topic_missing(state.producer, topic, timeout=5.0)
        except kafka.KafkaCredentialsError as exc:
            self._note_refusal(str(exc))  # _on_client_error saw it too; this says it at once
            return
        except (kafka.KafkaException, RuntimeError):
            return  # no answer (or the handle is gone): ALL_BROKERS_DOWN and the drain loop deal with it
        if missing:
            self._note_topic_missing(topic)  # publishes go to the spool from now on...
            state.purge_requested = True  # ...and so does what librdkafka holds

    def _drain(self, state: _ProcessState, deadline: float | None = None) -> None:
        """Republish spooled messages in order while Kafka answers; stop diverting once empty.

        A separate short-lived librdkafka producer does it, because the main one only
        reports failures and the spool must know exactly which messages Kafka has.
        """
        with self._drain_lock:
            if state.diverting and not self._kafka_ready(state):
                return
            if state.stale_producer_id:
                # Kafka answers again after every broker was down, maybe a rebuilt or
                # failed-over cluster that hands out producer ids afresh. One that gives
                # our id to another producer (the drainer below, another process) takes
                # our next batches for duplicates of theirs and drops them while
                # acknowledging them. A new handle gets an id from these brokers; what
                # the old one still held is spooled and resent (a duplicate at worst).
                state.stale_producer_id = False
                self._recreate(state, "after every broker was down")
            drainer: kafka.Producer | None = None
            while not state.stopping.is_set() and (deadline is None or time.monotonic() < deadline):
                batch = self.spool.claim(DRAIN_BATCH)
                if not batch:
                    if self.spool.count() == 0:
                        if state.diverting:
                            logger.info("spool drained: publishing to Kafka again")
                        state.diverting = False
                    return
                drainer = drainer or kafka.new_producer(self.settings.kafka, **self._overrides)
                reports: dict[int, kafka.KafkaError | None] = {}
                for message in batch:
                    drainer.produce(
                        message.topic, message.value, message.key,
                        on_delivery=functools.partial(_record_report, reports, message.seq),
                    )
                drainer.flush(DELIVERY_TIMEOUT)  # every message is reported by then
                delivered = [seq for seq, err in reports.items() if err is None]
                self.spool.remove(delivered)
                self.stats.drained += len(delivered)
                if len(delivered) < len(batch):
                    logger.warning("spool drain: %d of %d not delivered; will retry", len(batch) - len(delivered),
                                   len(batch))
                    self.spool.release()
                    state.stopping.wait(1.0)
                    return

    def drain(self, timeout: float = 60.0) -> int:
        """Republish what the spool holds now, for up to ``timeout`` seconds; return what is left."""
        state = self._state or self._start()
        self._drain(state, deadline=time.monotonic() + timeout)
        return self.spool.count()

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Messages handed to librdkafka in this process and not yet acknowledged."""
        return len(self._state.producer) if self._state is not None else 0

    def flush(self, timeout: float = 10.0) -> int:
        """Wait up to ``timeout`` seconds for deliveries; return how many are still undelivered."""
        state = self._state
        return _serve_reports(state.producer, timeout) if state is not None else 0

    def close(self, timeout: float = 10.0) -> int:
        """Flush for up to ``timeout`` seconds, spool what is left, stop; return how many were spooled."""
        with self._lock:
            state, self._state = self._state, None
        if state is None or state.pid != os.getpid():
            return 0
        state.stopping.set()
        interrupted = False
        try:
            state.thread.join(timeout)
            _serve_reports(state.producer, timeout)
        except KeyboardInterrupt:
            # Ctrl-C again while Kafka keeps us waiting: wait no longer, spool what is left
            # (below, local and quick), then let the interrupt go on.
            interrupted = True
        with state.send_lock:
            state.closed = True  # other threads' publishes go to the spool from now on
        left = _serve_reports(state.producer, 0)
        if left:
            # Purged messages come back as failed deliveries and are spooled; nothing is
            # left "in queue" for librdkafka to warn about when the handle goes away.
            state.producer.purge(in_queue=True, in_flight=True)
            _serve_reports(state.producer, min(timeout, 5.0))
            logger.warning("%d undelivered ops were spooled at shutdown (%s)", left, self.spool.path)
        self.spool.close()
        if interrupted:
            raise KeyboardInterrupt
        return left

    def _forget_after_fork(self) -> None:
        # The handle and its thread belong to the parent; this child starts afresh.
        self._lock = threading.Lock()
        self._drain_lock = threading.Lock()
        self._state = None


def _serve_reports(producer: kafka.Producer, timeout: float) -> int:
    """Flush for up to ``timeout`` seconds, serving delivery reports; return how many are left.

    After a fatal error (an idempotent producer refused its id) ``flush()`` raises instead
    of returning: the failed deliveries are still to be served, so that they are spooled.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            return producer.flush(max(0.0, deadline - time.monotonic()))
        except kafka.KafkaException as exc:
            logger.debug("Kafka producer flush: %s", exc)
            if time.monotonic() >= deadline:
                return len(producer)
            time.sleep(0.05)


def _record_report(
    reports: dict[int, kafka.KafkaError | None], seq: int, err: kafka.KafkaError | None, _msg: kafka.Message
) -> None:
    reports[seq] = err


def close_all(timeout: float = 10.0) -> None:
    """Close every producer of this process (flush, then spool the rest).

    Interrupted (Ctrl-C), it closes the others without waiting for Kafka, then raises
    :class:`KeyboardInterrupt`: every one's undelivered ops are spooled either way.
    """
    interrupted = False
    for producer in list(_live_producers):
        try:
            producer.close(0.0 if interrupted else timeout)
        except KeyboardInterrupt:
            interrupted = True
        except Exception:
            logger.exception("closing a producer failed")
    if interrupted:
        raise KeyboardInterrupt


_shutdown_pid = 0


def _shut_down(timeout: float) -> None:
    """Close every producer for good: this process's later publishes go to the spool."""
    global _shutdown_pid
    _shutdown_pid = os.getpid()
    close_all(timeout)


def _shut_down_at_exit() -> None:
    try:
        _shut_down(5.0)
    except KeyboardInterrupt:
        # Ctrl-C again while the producers flushed at exit: they stopped waiting for Kafka
        # and spooled what it had not confirmed. The process is ending: no traceback.
        logger.info("interrupted while flushing to Kafka at exit: undelivered ops are in the spool")


def _after_fork_in_child() -> None:
    for producer in list(_live_producers):
        producer._forget_after_fork()


_sigterm_pid = 0


def _install_sigterm_handler() -> None:
    """On SIGTERM, close producers first, then do what the process did before.

    Only in the main thread and once per process; an application's own handler keeps
    working because it is called afterwards.

    The closing runs in a thread of its own, never in the handler: the handler
    interrupts the main thread wherever it is, possibly inside a spool transaction
    whose lock a close on that same thread would wait for forever. The main thread
    goes on meanwhile (its publishes go to the spool), and is signalled again once
    the producers are closed; the handler then passes SIGTERM on.
    """
    global _sigterm_pid
    if _sigterm_pid == os.getpid() or threading.current_thread() is not threading.main_thread():
        return
    _sigterm_pid = os.getpid()
    previous = signal.getsignal(signal.SIGTERM)
    closed = threading.Event()
    closing: list[threading.Thread] = []

    def pass_on(signum: int, frame: Any) -> None:
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    def close_then_signal_again() -> None:
        try:
            _shut_down(timeout=5.0)
        finally:
            closed.set()
            main = threading.main_thread().ident
            try:
                if main is not None:
                    signal.pthread_kill(main, signal.SIGTERM)
            except ProcessLookupError:  # the main thread is gone: the process is ending anyway
                pass

    def on_sigterm(signum: int, frame: Any) -> None:
        if closed.is_set():
            pass_on(signum, frame)
        elif not closing:
            closing.append(threading.Thread(target=close_then_signal_again, name="crr-sigterm", daemon=True))
            try:
                closing[0].start()
            except RuntimeError:  # interpreter shutdown: atexit closes the producers
                closed.set()
                pass_on(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_shut_down_at_exit)
