"""The whole loop as real processes: target Redis, Celery broker, worker, bridge, Kafka.

``LoopStack`` wires them together through ``tests/apps/loop_app.py`` (configured from
environment variables), and gives the test a producer with the very same settings, so a
test publishes ops exactly as an application would, then reads Redis and the DLQ.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery_redis_retry.capture.producer import RetryProducer
from celery_redis_retry.config import Settings, waiting_topic_name
from celery_redis_retry.dlq.record import DeadLetter, decode_record
from celery_redis_retry.kafka import CLASSIC_PROTOCOL_ONLY
from celery_redis_retry.testing import (
    TEST_CONSUMER_SETTINGS,
    ApacheKafka,
    CeleryCommand,
    CeleryWorker,
    KafkaBroker,
    KafkaUser,
    RedisCluster,
    RedisSentinel,
    RedisServer,
    read_topic,
    wait_until,
)

APPS_DIR = Path(__file__).parent / "apps"
sys.path.insert(0, str(APPS_DIR))

from loop_scripts import SCRIPTS  # noqa: E402 - lives beside the app, which imports it too

#: Fast group joins and topic discovery for short-lived test groups.
KAFKA_EXTRA = {**TEST_CONSUMER_SETTINGS, "topic.metadata.refresh.interval.ms": 1000}


def data_keys(client: Any) -> int:
    """How many keys the ops wrote: every key but the write stamps and markers (``crr:...``)."""
    return int(client.dbsize()) - sum(1 for _ in client.scan_iter(match="crr:*", count=1000))


@dataclass
class LoopStack:
    """One isolated copy of the system: its own topic, group, queue, target and spool."""

    kafka: KafkaBroker | ApacheKafka | KafkaUser
    target: RedisServer | RedisCluster | RedisSentinel
    broker_url: str
    workdir: Path
    max_retries: int = 3
    backoff: float = 0.5
    backoff_max: float = 4.0
    extra_env: dict[str, str] = field(default_factory=dict)
    #: Targets besides "default": name -> Redis URL.
    extra_targets: dict[str, str] = field(default_factory=dict)
    #: The Celery broker's redis-server, when the stack started one.
    broker: RedisServer | None = None
    #: librdkafka settings on top of the test defaults, e.g. ``{"group.protocol": "consumer"}``.
    kafka_settings: dict[str, Any] = field(default_factory=dict)
    #: Per process role ("app": the test's producer, "bridge", "worker", "operator": the CLI),
    #: librdkafka settings on top of those: each role its own Kafka principal, say.
    kafka_roles: dict[str, dict[str, Any]] = field(default_factory=dict)
    name: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    worker: CeleryWorker | None = None
    bridges: list[CeleryCommand] = field(default_factory=list)
    _producer: RetryProducer | None = None

    @property
    def topic(self) -> str:
        return f"ops-{self.name}"

    @property
    def dlq_topic(self) -> str:
        return f"{self.topic}.dlq"

    @property
    def env(self) -> dict[str, str]:
        return {
            "PYTHONPATH": str(APPS_DIR),
            "CRR_BROKER_URL": self.broker_url,
            "CRR_BOOTSTRAP": self.kafka.bootstrap_servers,
            "CRR_KAFKA_EXTRA": json.dumps(self.kafka_extra),
            "CRR_TARGET_URL": self.target.url,
            "CRR_TOPIC": self.topic,
            "CRR_GROUP": f"group-{self.name}",
            "CRR_QUEUE": f"queue-{self.name}",
            "CRR_SPOOL": str(self.workdir / "spool.sqlite3"),
            "CRR_MAX_RETRIES": str(self.max_retries),
            "CRR_BACKOFF": str(self.backoff),
            "CRR_BACKOFF_MAX": str(self.backoff_max),
            "CRR_EXTRA_TARGETS": json.dumps(self.extra_targets),
            **self.extra_env,
        }

    @property
    def observer_config(self) -> dict[str, Any]:
        """How the test itself reads topics: as the cluster's super user when the stack runs as a SCRAM user."""
        return dict(self.kafka.cluster.config if isinstance(self.kafka, KafkaUser) else self.kafka.config)

    def env_for(self, role: str) -> dict[str, str]:
        """:attr:`env` with the Kafka settings of ``role`` (see :attr:`kafka_roles`)."""
        return {**self.env, "CRR_KAFKA_EXTRA": json.dumps(self.kafka_extra_for(role))}

    @property
    def kafka_extra(self) -> dict[str, Any]:
        """Client settings on top of the bootstrap servers: fast test groups, plus the broker's own (TLS, SASL)."""
        return self.kafka_extra_for(None)

    def kafka_extra_for(self, role: str | None) -> dict[str, Any]:
        """:attr:`kafka_extra` with the settings of ``role``, if any."""
        own = {k: v for k, v in self.kafka.config.items() if k != "bootstrap.servers"}
        extra = {**KAFKA_EXTRA, **own, **self.kafka_settings, **self.kafka_roles.get(role or "", {})}
        if extra.get("group.protocol") == "consumer":  # KIP-848: the broker owns these
            extra = {k: v for k, v in extra.items() if k not in CLASSIC_PROTOCOL_ONLY}
        return extra

    @property
    def waiting_topics(self) -> list[str]:
        """The waiting topic of every target of the stack."""
        return [waiting_topic_name(self.topic, target) for target in ("default", *self.extra_targets)]

    @property
    def ends_topic(self) -> str:
        """Where the workers report the ops they ended."""
        return f"{self.topic}.ends"

    def create_topics(self, partitions: int = 4) -> None:
        """Create the ops, DLQ, ends and waiting topics (a no-op on brokers that create topics on first use)."""
        for topic in (self.topic, self.dlq_topic, self.ends_topic, *self.waiting_topics):
            self.kafka.create_topic(topic, partitions)

    def settings(self) -> Settings:
        """The settings loop_app builds from :attr:`env`, for the test's own producer."""
        env = self.env
        return Settings.from_mapping(
            {
                "redis_retry_kafka": {"bootstrap.servers": env["CRR_BOOTSTRAP"], **self.kafka_extra_for("app")},
                "redis_retry_targets": {"default": env["CRR_TARGET_URL"], **self.extra_targets},
                "redis_retry_topic": env["CRR_TOPIC"],
                "redis_retry_consumer_group": env["CRR_GROUP"],
                "redis_retry_scripts": SCRIPTS,
                "redis_retry_spool_path": str(self.workdir / "test-producer-spool.sqlite3"),
                "redis_retry_signing_keys": json.loads(env.get("CRR_SIGNING_KEYS", "{}")),
            }
        )

    @property
    def producer(self) -> RetryProducer:
        if self._producer is None:
            self._producer = RetryProducer(self.settings(), handle_sigterm=False)
        return self._producer

    def publish_all(self, ops: Iterable[Any]) -> list[Any]:
        """Publish ``ops`` and wait until Kafka has every one of them."""
        published = list(ops)
        for op in published:
            self.producer.publish(op)
        assert self.producer.flush(30) == 0
        return published

    # -- processes -----------------------------------------------------------------------

    def start_worker(self, concurrency: int = 2) -> CeleryWorker:
        self.worker = CeleryWorker(
            "loop_app", queues=[f"queue-{self.name}"], concurrency=concurrency, env=self.env_for("worker"),
            cwd=str(self.workdir), log_dir=self.workdir,
        )
        return self.worker.start(timeout=90)

    def start_bridge(self, *args: str, env: dict[str, str] | None = None) -> CeleryCommand:
        bridge = CeleryCommand(
            "loop_app", ["redis-retry", "bridge", *args], env={**self.env_for("bridge"), **(env or {})},
            cwd=str(self.workdir),
            log_dir=self.workdir,
        )
        self.bridges.append(bridge)
        return bridge.start(ready_pattern=r"bridge consuming", timeout=90)

    def cli(
        self, *args: str, input: str | None = None, env: dict[str, str] | None = None,  # noqa: A002
    ) -> subprocess.CompletedProcess[str]:
        """``celery -A loop_app ARGS`` run to completion as a real subprocess, with this stack's settings
        (``env`` on top of them)."""
        return subprocess.run(
            [sys.executable, "-m", "celery", "-A", "loop_app", *args],
            env={**os.environ, **self.env_for("operator"), **(env or {})}, cwd=str(self.workdir), input=input,
            capture_output=True, text=True, timeout=120, check=False,
        )

    def wait_assigned(self, bridge: CeleryCommand, timeout: float = 60.0) -> None:
        bridge.wait_for_log(r"assigned " + re.escape(self.topic), timeout=timeout)

    def committed_offsets(self) -> dict[int, int]:
        """The consumer group's committed offset per partition of the topic (-1001: none)."""
        return {p: o.committed for p, o in self._group_offsets().items()}

    def end_offsets(self) -> dict[int, int]:
        """The high watermark of each partition of the topic."""
        return {p: o.high for p, o in self._group_offsets().items()}

    def _group_offsets(self) -> dict[int, Any]:
        from celery_redis_retry import kafka

        return kafka.group_offsets(self.settings().kafka, self.topic, f"group-{self.name}")

    def stop(self, *, graceful: bool = True) -> None:
        """Stop the bridges, then the worker; ``graceful=False`` kills them (a test's cleanup, where
        nothing is checked any more: a graceful stop waits for ops in flight and tasks running)."""
        for process in [*self.bridges, self.worker]:
            if process is not None and process.running:
                if graceful:
                    process.stop(timeout=30)
                else:
                    process.kill()
        if self._producer is not None:
            self._producer.close(5)
            self._producer = None

    # -- observations --------------------------------------------------------------------

    def client(self) -> Any:
        """A redis-py client of the target (a ``RedisCluster`` for a cluster target)."""
        return self.target.client()

    def wait_for(self, check: Callable[[], Any], timeout: float, what: str) -> Any:
        """Poll ``check`` until it returns something truthy; fail with the process logs otherwise."""
        try:
            return wait_until(check, timeout, interval=0.25, what=what)
        except TimeoutError as exc:
            logs = "\n".join(
                f"--- {p.log_path} ---\n{p.log_tail(30)}" for p in [*self.bridges, self.worker] if p is not None
            )
            raise AssertionError(f"{exc}\n{logs}") from exc

    def dead_letters(self, count: int | None = None, timeout: float = 60.0, idle: float = 3.0) -> list[DeadLetter]:
        records = read_topic(self.observer_config, self.dlq_topic, count=count, timeout=timeout, idle=idle)
        return [decode_record(r.value or b"") for r in records]

    def dlq_is_empty(self, settle: float = 3.0) -> bool:
        return not read_topic(self.observer_config, self.dlq_topic, timeout=settle + 2, idle=settle)

    def worker_log_count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.worker.log_text())) if self.worker else 0

    def bridge_log_count(self, pattern: str) -> int:
        return sum(len(re.findall(pattern, b.log_text())) for b in self.bridges)

    def outage_seen(self) -> bool:
        """Whether a bridge opened a circuit or a worker parked ops: the target's outage was noticed."""
        return self.bridge_log_count(r"circuit open") + self.worker_log_count(r"ops for target \S+ parked") > 0

