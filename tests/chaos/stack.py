"""Every process of a chaos run: three targets, a Celery broker, two workers, two bridges, the app.

Built on :class:`loop_stack.LoopStack` (topics, settings, the Celery broker) with more
than it starts by itself: a Sentinel-managed target and a Redis Cluster target with
replicas beside the plain one, two workers and two bridges (so a paused one is replaced
by the other), and the publishing app as a process of its own (:mod:`chaos.app`).
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loop_stack import LoopStack

from celery_redis_retry import kafka
from celery_redis_retry.targets import connect
from celery_redis_retry.testing import (
    ApacheKafka,
    CeleryCommand,
    CeleryWorker,
    ManagedProcess,
    RabbitMQServer,
    RedisCluster,
    RedisSentinel,
)

from .ledger import Ledger

CHAOS_DIR = Path(__file__).parent
#: A lost Celery task (a SIGKILLed broker, a worker killed mid-pop) is handed over again after this.
REDELIVERY_S = 10
#: A task a paused worker holds goes to the other worker after this (Redis broker).
VISIBILITY_S = 8
#: librdkafka settings on top of the loop's fast test groups: a rebalance ends in seconds.
GROUP_SETTINGS = {"max.poll.interval.ms": 10_000}


@dataclass
class ChaosStack:
    """The processes of one run; :attr:`loop` holds topics, settings and the plain target."""

    loop: LoopStack
    sentinel: RedisSentinel
    cluster: RedisCluster
    rabbitmq: RabbitMQServer | None
    seed: int
    rate: float
    workers: list[CeleryWorker] = field(default_factory=list)
    bridges: list[CeleryCommand] = field(default_factory=list)
    app: ManagedProcess | None = None
    #: Every worker ever started, the replaced ones too (their logs say what they did).
    all_workers: list[CeleryWorker] = field(default_factory=list)
    #: What :meth:`supervise` had to start again: processes that exited by themselves.
    restarts: list[str] = field(default_factory=list)
    app_stopped: bool = False

    @property
    def ledger_path(self) -> Path:
        return self.loop.workdir / "ledger.txt"

    @property
    def kafka_cluster(self) -> ApacheKafka | None:
        return self.loop.kafka if isinstance(self.loop.kafka, ApacheKafka) else None

    # -- processes -------------------------------------------------------------------------

    def start_worker(self, slot: int | None = None) -> CeleryWorker:
        """Start worker ``slot`` (a new one when None): ``-n w<slot>@%h``, two pool processes."""
        slot = len(self.workers) if slot is None else slot
        worker = CeleryWorker(
            "loop_app", queues=[f"queue-{self.loop.name}"], concurrency=2, env=self.loop.env_for("worker"),
            cwd=str(self.loop.workdir), log_dir=self.loop.workdir, extra_args=("-n", f"w{slot}@%h"),
        )
        if slot < len(self.workers):
            self.workers[slot] = worker
        else:
            self.workers.append(worker)
        self.all_workers.append(worker)
        return worker.start(timeout=90)

    def start_bridge(self, slot: int | None = None) -> CeleryCommand:
        slot = len(self.bridges) if slot is None else slot
        bridge = self.loop.start_bridge("--batch-size", "100")
        if slot < len(self.bridges):
            self.bridges[slot] = bridge
        else:
            self.bridges.append(bridge)
        return bridge

    def start_app(self) -> ManagedProcess:
        """Start (or restart) the publishing app where the ledger says it stopped."""
        start = Ledger.read(self.ledger_path).next_index
        self.app = ManagedProcess(
            [sys.executable, str(CHAOS_DIR / "app.py"), "--ledger", str(self.ledger_path), "--seed", str(self.seed),
             "--start", str(start), "--rate", str(self.rate)],
            env=self.loop.env_for("app"), cwd=str(self.loop.workdir), name="chaos-app", log_dir=self.loop.workdir,
        )
        self.app.start()
        self.app.wait_for_log(r"chaos app publishing", timeout=60)
        return self.app

    def stop_app(self) -> None:
        """SIGTERM the app: it ends its batch, flushes and leaves."""
        self.app_stopped = True
        if self.app is not None and self.app.running:
            self.app.stop(timeout=60)

    def supervise(self) -> list[str]:
        """Start again any worker, bridge or app that exited by itself, as systemd's ``Restart=always``
        would; return what was restarted. (kombu's Redis transport can end a worker whose broker
        dies under it: "Unrecoverable error: AttributeError ... 'hostname'".)"""
        restarted = []
        for slot, worker in enumerate(self.workers):
            if not worker.running:
                restarted.append(f"worker{slot} (exited {worker.returncode})")
                self.start_worker(slot)
        for slot, bridge in enumerate(self.bridges):
            if not bridge.running:
                restarted.append(f"bridge{slot} (exited {bridge.returncode})")
                self.start_bridge(slot)
        if self.app is not None and not self.app.running and not self.app_stopped:
            restarted.append(f"app (exited {self.app.returncode})")
            self.start_app()
        self.restarts += restarted
        return restarted

    def processes(self) -> dict[str, ManagedProcess]:
        """Every process whose memory the run follows, by role."""
        named: dict[str, ManagedProcess] = {f"bridge{i}": b for i, b in enumerate(self.bridges)}
        named.update({f"worker{i}": w for i, w in enumerate(self.workers)})
        if self.app is not None:
            named["app"] = self.app
        return named

    def stop(self) -> None:
        for process in [self.app, *self.bridges, *self.workers]:
            if process is not None:
                with contextlib.suppress(Exception):
                    process.kill()
        self.loop.stop(graceful=False)
        self.sentinel.stop()
        self.cluster.stop()

    # -- observations ----------------------------------------------------------------------

    def client_for(self, target: str) -> Any:
        """A redis-py client of ``target`` ("default" or one of the extra targets); close it when done."""
        url = self.loop.target.url if target == "default" else self.loop.extra_targets[target]
        return connect(url, socket_timeout=5.0, socket_connect_timeout=2.0)

    def lag(self) -> int | None:
        """Ops not yet ended: the group's lag on the ops topic plus the waiting topics' (None: Kafka silent)."""
        settings = self.loop.settings().kafka
        group = f"group-{self.loop.name}"
        total = 0
        try:
            for topic, group_id in [(self.loop.topic, group),
                                    *((w, f"{group}.waiting") for w in self.loop.waiting_topics)]:
                for offsets in kafka.group_offsets(settings, topic, group_id).values():
                    total += max(0, offsets.high - max(offsets.committed, offsets.low))
        except Exception:  # Kafka down, a rebalance in progress: no reading now
            return None
        return total

    def rss_mb(self) -> dict[str, float]:
        """Resident memory per role (a worker counts its pool processes too), in MiB."""
        return {role: process.rss_kib() / 1024 for role, process in self.processes().items() if process.running}


def extra_env() -> dict[str, str]:
    """The settings of every process of a chaos run, on top of the loop's."""
    return {
        "CRR_REDELIVERY_TIMEOUT": str(REDELIVERY_S),
        "CRR_VISIBILITY_TIMEOUT": str(VISIBILITY_S),
    }


def wait_quiet(stack: ChaosStack, timeout: float) -> float:
    """Wait until nothing is left to end (lag 0 twice in a row); the seconds it took."""
    began = time.monotonic()
    zero = 0
    while time.monotonic() - began < timeout:
        stack.supervise()
        lag = stack.lag()
        zero = zero + 1 if lag == 0 else 0
        if zero >= 2:
            return time.monotonic() - began
        time.sleep(0.5)
    raise AssertionError(f"ops still in flight after {timeout:.0f}s (lag {stack.lag()})")
