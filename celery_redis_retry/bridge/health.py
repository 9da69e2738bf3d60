"""``/healthz`` and ``/readyz``: what a bridge answers a process supervisor or Kubernetes probes.

- ``/healthz`` (liveness): 200 while the bridge's loop turns, 503 once it has not turned for
  :data:`STALLED_AFTER` seconds: a hung loop, which only a restart cures. A bridge still in
  its start checks is alive (those end by themselves, with an exit status).
- ``/readyz`` (readiness): 200 when Kafka answers, the Celery broker answers and the bridge
  owns partitions of the retry topic; 503 otherwise. A bridge that is not ready loses
  nothing: its ops wait in Kafka.

Each answer is a JSON object naming every check and what it found. The checks run when
a probe asks (at most once a second; Kubernetes probes every 10 s by default) from the
server's thread, on connections of their own: the loop's consumers and its Celery
producer are never touched from here.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from celery_redis_retry import kafka
from celery_redis_retry.bridge.dispatch import TaskSender
from celery_redis_retry.errors import ConfigurationError

if TYPE_CHECKING:
    from celery_redis_retry.bridge.loop import Bridge

logger = logging.getLogger(__name__)

#: Seconds without a turn of the loop after which the bridge is reported not alive. A
#: turn waits at most about a poll timeout plus a hand-over; a minute is far beyond that.
STALLED_AFTER = 60.0
#: How long one check waits for Kafka or the Celery broker.
CHECK_TIMEOUT = 2.0
#: Answers younger than this are served again rather than asked anew.
CACHE_SECONDS = 1.0


class BridgeHealth:
    """The liveness and readiness of one bridge, checked on demand."""

    def __init__(self, bridge: Bridge, *, stalled_after: float = STALLED_AFTER) -> None:
        self.bridge = bridge
        self.stalled_after = stalled_after
        self._broker: TaskSender | None = None
        self._kafka: kafka.Producer | None = None
        self._lock = threading.Lock()
        self._ready: tuple[float, bool, dict[str, Any]] | None = None

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        """Whether the loop turned within ``stalled_after`` seconds (or has not started yet)."""
        last = self.bridge.last_turn
        if last is None:
            return True, {"loop": "starting"}
        idle = time.monotonic() - last
        alive = idle < self.stalled_after
        return alive, {"loop": "turning" if alive else "stalled", "seconds_since_last_turn": round(idle, 1)}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether Kafka and the Celery broker answer and partitions are assigned."""
        with self._lock:
            now = time.monotonic()
            if self._ready is not None and now - self._ready[0] < CACHE_SECONDS:
                return self._ready[1], self._ready[2]
            checks = {"kafka": self._check_kafka(), "celery_broker": self._check_broker(),
                      "partitions": self._check_partitions()}
            ready = all(value == "ok" for value in checks.values())
            self._ready = (now, ready, checks)
            return ready, checks

    def _check_kafka(self) -> str:
        try:
            if self._kafka is None:
                self._kafka = kafka.new_producer(self.bridge.settings.kafka)
            kafka.cluster_metadata(self._kafka, self.bridge.settings.topic, timeout=CHECK_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - any failure is the answer
            return f"no answer: {exc}"
        return "ok"

    def _check_broker(self) -> str:
        # Reads the replay queue's length: a round trip to the broker on a connection of its own.
        if self._broker is None:
            self._broker = TaskSender(self.bridge.app, self.bridge.settings.queue, one_task_per_op=False)
        if self._broker.queued_tasks() is None:
            return "no answer"
        return "ok"

    def _check_partitions(self) -> str:
        owned = self.bridge.assigned_partitions
        return "ok" if owned > 0 else "no partition of the retry topic assigned"

    def close(self) -> None:
        """Release the checks' connections."""
        if self._broker is not None:
            self._broker.close()
        if self._kafka is not None:
            self._kafka.flush(0)
            self._kafka = None


def _handler(health: BridgeHealth) -> type[BaseHTTPRequestHandler]:
    class HealthHandler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] == "/healthz":
                ok, checks = health.liveness()
            elif self.path.split("?", 1)[0] == "/readyz":
                ok, checks = health.readiness()
            else:
                self._answer(404, {"error": "not found: /healthz and /readyz are served here"})
                return
            self._answer(200 if ok else 503, {"status": "ok" if ok else "failing", **checks})

        def _answer(self, status: int, document: dict[str, Any]) -> None:
            body = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
            logger.debug("health %s", format % args)

    return HealthHandler


def serve_health(bridge: Bridge, port: int, *, addr: str = "0.0.0.0") -> ThreadingHTTPServer:  # noqa: S104 - a probe target
    """Serve ``/healthz`` and ``/readyz`` of ``bridge`` on ``addr:port`` from a daemon thread."""
    health = BridgeHealth(bridge)
    try:
        server = ThreadingHTTPServer((addr, port), _handler(health))
    except OSError as exc:
        raise ConfigurationError(f"cannot serve health checks on port {port}: {exc}") from None
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="crr-bridge-health", daemon=True)
    thread.start()
    return server
