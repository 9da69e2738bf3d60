"""Per-target circuits: can this target take writes now?

An outage is not an op's fault. When a target refuses connections, times out, or
answers LOADING, READONLY, MASTERDOWN, CLUSTERDOWN or TRYAGAIN (see
:func:`celery_redis_retry.policy.is_outage`), its circuit opens: the bridge stops
handing its ops to Celery and moves them to the target's waiting topic in Kafka, where
they stay, committed, until a probe finds the target able to take writes again. The
circuit then *recovers*: ops flow at ``redis_retry_recovery_rate`` ops/s, a rate that
doubles every second, so that a backlog drains at full speed a few seconds later
without a stampede on a server that has just come back.

Where the state lives: nowhere but in the target itself. A circuit is an observation,
made again by every process that needs it (each bridge probes every target once a
second, each worker process learns from the op it just ran), never a record that could
outlive the outage or be lost with the process. A restarted bridge or worker probes
before it trusts anything, so it neither forgets an outage (the probe fails) nor keeps
one that ended (it succeeds). What must survive is the ops, and they are in Kafka:
the waiting topics are the durable half of the state. See ``docs/outages.md``.

An operator's pause (:mod:`celery_redis_retry.control`) is a second reason to hold a
target: while it lasts the circuit shows ``paused`` and admits nothing, whatever the
probes find; when it ends the circuit recovers, as after an outage.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery_redis_retry import policy
from celery_redis_retry.errors import TargetPausedError
from celery_redis_retry.targets import connect, is_cluster_url

if TYPE_CHECKING:
    from celery_redis_retry.control import TargetPause

logger = logging.getLogger(__name__)

CLOSED = "closed"
OPEN = "open"
RECOVERING = "recovering"
#: An operator paused the target (see :mod:`celery_redis_retry.control`): held like an open circuit.
PAUSED = "paused"
#: The states in which a target's ops are held in its waiting topic.
HOLDING = frozenset((OPEN, PAUSED))

#: Seconds between probes of a closed circuit, and the backoff of an open one.
PROBE_INTERVAL = 1.0
OPEN_PROBE_FIRST = 0.25
OPEN_PROBE_MAX = 2.0
#: Socket timeouts of a probe: a target that does not answer within them is down.
PROBE_TIMEOUT = 2.0
#: The recovery rate doubles every second for this long, then the circuit is closed.
RECOVERY_SECONDS = 6.0


def probe(client: Any, *, cluster: bool = False) -> None:
    """Raise the error an op would meet if the target cannot take writes now.

    PING answers LOADING while a dataset loads and MASTERDOWN on a replica that lost its
    master; ROLE tells a replica (a write would get READONLY) from a primary; a cluster
    must say ``cluster_state:ok``. Nothing is written.
    """
    import redis.exceptions as rex

    if cluster:
        state = client.cluster_info().get("cluster_state")
        if state != "ok":
            raise rex.ClusterDownError(f"CLUSTERDOWN cluster_state is {state!r}")
        client.ping()
        return
    client.ping()
    try:
        role = client.execute_command("ROLE")
    except rex.NoPermissionError:
        return  # an ACL user without ROLE: PING answered, which is what can be told
    if role and role[0] not in (b"master", "master"):
        raise rex.ReadOnlyError("READONLY the target is a replica now (ROLE says so): it takes no writes")


class TargetProbe:
    """:func:`probe` of one target URL, through a client of its own with the probe's timeouts."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.cluster = is_cluster_url(url)
        self._client: Any = None

    def __call__(self) -> None:
        """Raise the error an op would meet if the target cannot take writes now."""
        if self._client is None:
            self._client = connect(self.url, socket_timeout=PROBE_TIMEOUT, socket_connect_timeout=PROBE_TIMEOUT,
                                   health_check_interval=0)
        probe(self._client, cluster=self.cluster)

    def close(self) -> None:
        """Release the client's connections."""
        client, self._client = self._client, None
        if client is not None:
            client.close()


@dataclass(frozen=True)
class CircuitState:
    """One target's circuit, as this process sees it now."""

    target: str
    state: str  # closed | open | recovering | paused
    since: float  # UNIX time of the last change
    reason: str  # why it last opened or was paused ("" when it never was)
    opened: int  # times it opened since start


class _Circuit:
    def __init__(self, target: str) -> None:
        self.target = target
        self.state = CLOSED
        self.since = time.time()
        self.changed = time.monotonic()
        self.reason = ""
        self.opened = 0
        self.admitted = 0  # ops let through since recovery began
        self.wake = threading.Event()
        self.pause: TargetPause | None = None  # an operator's pause, while it lasts

    @property
    def shown_state(self) -> str:
        """The state callers see: ``paused`` over whatever the probes found."""
        return PAUSED if self.pause is not None else self.state

    @property
    def shown_reason(self) -> str:
        return self.pause.describe() if self.pause is not None else self.reason


class Circuits:
    """The circuits of every target in one bridge, each kept current by a probe thread.

    ``probe_target(name)`` raises when the target cannot take writes (see :func:`probe`);
    ``on_change(state)`` is called once per change, outside the lock.
    """

    def __init__(
        self,
        targets: Iterable[str],
        probe_target: Callable[[str], None],
        *,
        recovery_rate: int,
        on_change: Callable[[CircuitState], None] | None = None,
    ) -> None:
        self._circuits = {name: _Circuit(name) for name in targets}
        self._probe = probe_target
        self.recovery_rate = recovery_rate
        self._on_change = on_change
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- what callers ask ----------------------------------------------------------------

    def state(self, target: str) -> str:
        """``closed``, ``open``, ``recovering`` or ``paused`` (closed for a target not watched here)."""
        circuit = self._circuits.get(target)
        if circuit is None:
            return CLOSED
        return circuit.shown_state

    def holding(self, target: str) -> bool:
        """Whether ``target``'s ops must wait: its circuit is open, or an operator paused it."""
        return self.state(target) in HOLDING

    def reason(self, target: str) -> str:
        """Why ``target``'s circuit last opened, or who paused it and why ("" if neither)."""
        circuit = self._circuits.get(target)
        return circuit.shown_reason if circuit is not None else ""

    def set_pause(self, pause: TargetPause) -> None:
        """An operator paused or resumed ``pause.target`` (a :class:`~celery_redis_retry.control.ControlWatch` says).

        Resuming starts the recovery ramp, as a circuit closing after an outage does, so
        that a backlog held by a long pause drains without a stampede on the target.
        """
        circuit = self._circuits.get(pause.target)
        if circuit is None:
            return
        with self._lock:
            if (circuit.pause is not None) == pause.paused:
                return
            circuit.pause = pause if pause.paused else None
            circuit.since = time.time()
            if not pause.paused and circuit.state == CLOSED:
                circuit.state, circuit.changed = RECOVERING, time.monotonic()
            circuit.admitted = 0
            view = _view(circuit)
        if self._on_change is not None:
            self._on_change(view)

    def admit(self, target: str, count: int) -> int:
        """How many of ``count`` ops for ``target`` may be handed over now (the first ones)."""
        circuit = self._circuits.get(target)
        if circuit is None:
            return count
        with self._lock:
            if circuit.pause is not None or circuit.state == OPEN:
                return 0
            if circuit.state == CLOSED:
                return count
            elapsed = time.monotonic() - circuit.changed
            if elapsed >= RECOVERY_SECONDS:
                return count  # the probe thread closes it within a second
            allowed = self._allowance(elapsed)
            granted = max(0, min(count, allowed - circuit.admitted))
            circuit.admitted += granted
            return granted

    def suspect(self, target: str) -> None:
        """Probe ``target`` at once (something else saw it fail)."""
        circuit = self._circuits.get(target)
        if circuit is not None:
            circuit.wake.set()

    def snapshot(self) -> list[CircuitState]:
        """Every circuit's state, for status lines and metrics."""
        with self._lock:
            return [_view(c) for c in self._circuits.values()]

    # -- probes --------------------------------------------------------------------------

    def start(self) -> None:
        """Probe every target now, then keep probing each in a thread of its own."""
        for circuit in self._circuits.values():
            self._probe_once(circuit)
        for circuit in self._circuits.values():
            thread = threading.Thread(target=self._watch, args=(circuit,), name=f"crr-probe-{circuit.target}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop the probe threads."""
        self._stopped.set()
        for circuit in self._circuits.values():
            circuit.wake.set()
        for thread in self._threads:
            thread.join(timeout=PROBE_TIMEOUT * 3)

    def _watch(self, circuit: _Circuit) -> None:
        failures = 0
        while not self._stopped.is_set():
            if circuit.state == OPEN:
                interval = min(OPEN_PROBE_MAX, OPEN_PROBE_FIRST * 2 ** failures)
                failures += 1
            else:
                interval, failures = PROBE_INTERVAL, 0
            circuit.wake.wait(interval)
            circuit.wake.clear()
            if self._stopped.is_set():
                return
            self._probe_once(circuit)
            if circuit.state == RECOVERING and time.monotonic() - circuit.changed >= RECOVERY_SECONDS:
                self._change(circuit, CLOSED, "")

    def _probe_once(self, circuit: _Circuit) -> None:
        try:
            self._probe(circuit.target)
        except Exception as exc:  # noqa: BLE001 - any failure of a probe is classified here
            if policy.is_outage(exc):
                self._change(circuit, OPEN, f"{type(exc).__name__}: {exc}")
            else:
                logger.debug("probe of target %r inconclusive: %r", circuit.target, exc)
            return
        if circuit.state == OPEN:
            self._change(circuit, RECOVERING, "")

    def _change(self, circuit: _Circuit, state: str, reason: str) -> None:
        with self._lock:
            if circuit.state == state:
                return
            circuit.state, circuit.changed, circuit.since = state, time.monotonic(), time.time()
            circuit.admitted = 0
            if state == OPEN:
                circuit.reason = reason
                circuit.opened += 1
            view = _view(circuit)
        if self._on_change is not None and circuit.pause is None:  # a paused one says so once, when paused
            self._on_change(view)

    # -- the recovery ramp ---------------------------------------------------------------

    def _allowance(self, elapsed: float) -> int:
        # The integral of rate * 2**t from 0 to elapsed, plus one second's worth at once.
        rate = self.recovery_rate
        return int(rate + rate * (2.0 ** elapsed - 1.0) / math.log(2.0))


def _view(circuit: _Circuit) -> CircuitState:
    return CircuitState(circuit.target, circuit.shown_state, circuit.since, circuit.shown_reason, circuit.opened)


class LocalCircuit:
    """A worker process's view: after an outage error, skip its target for a moment.

    A worker does not probe. The op that met the outage tells it; for ``hold`` seconds
    the ops for that target are parked in Kafka without trying (each try could cost a
    socket timeout), then the next op tries again. Nothing is kept across restarts: the
    first op after one is the probe.

    ``paused(target)`` says whether an operator paused the target (see
    :mod:`celery_redis_retry.control`): its ops are parked untried too, as long as it lasts.
    """

    def __init__(self, hold: float = 1.0, *, paused: Callable[[str], TargetPause | None] | None = None) -> None:
        self.hold = hold
        self._until: dict[str, float] = {}
        self._paused = paused

    def is_open(self, target: str) -> bool:
        """Whether ops for ``target`` should be parked without trying (an outage met here, or a pause)."""
        if self._paused is not None and self._paused(target) is not None:
            return True
        until = self._until.get(target)
        if until is None:
            return False
        if time.monotonic() >= until:
            del self._until[target]
            return False
        return True

    def opened(self, target: str) -> None:
        """An op for ``target`` just met an outage."""
        self._until[target] = time.monotonic() + self.hold

    def skipped(self, target: str) -> Exception:
        """Why an op for ``target`` is parked untried (the reason its parked message carries)."""
        pause = self._paused(target) if self._paused is not None else None
        if pause is not None:
            return TargetPausedError(f"target {target!r} {pause.describe()}")
        return ConnectionError(f"target {target!r} failed moments ago in this worker")
