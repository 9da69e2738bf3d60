"""The real processes a benchmark runs against: Kafka, redis-server, RabbitMQ, a Celery worker.

The broker always runs as a separate process (:class:`~celery_redis_retry.testing.EmbeddedKafka`,
the ``dev-kafka`` command): a broker inside the benchmark's own process would compete with
the code being measured for the GIL and for librdkafka's threads. The bridge and worker run
as subprocesses of ``benchmarks/apps/bench_app.py``, configured by :func:`bench_env`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from celery_redis_retry import kafka
from celery_redis_retry.testing import (
    KAFKA_VERSION,
    TEST_CONSUMER_SETTINGS,
    ApacheKafka,
    EmbeddedKafka,
    ManagedProcess,
    RedisServer,
    TansuKafka,
)

#: Folder of the benchmarks' Celery apps (``celery -A bench_app`` runs with it on PYTHONPATH).
APPS_DIR = Path(__file__).parent / "apps"


#: RabbitMQ the benchmarks use when asked to (the same server the RabbitMQ tests use).
RABBITMQ_URL = os.environ.get("CRR_BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")


@contextmanager
def embedded_kafka() -> Iterator[EmbeddedKafka]:
    """An embedded broker (librdkafka's mock cluster) in a subprocess, stopped on exit."""
    with EmbeddedKafka(log_dir=tempfile.mkdtemp(prefix="crr-bench-kafka-")).start() as broker:
        yield broker


def kafka_extra() -> dict[str, Any]:
    """Consumer settings for fast group joins of the short-lived benchmark groups."""
    return {**TEST_CONSUMER_SETTINGS, "topic.metadata.refresh.interval.ms": 1000}


#: The Kafka brokers a benchmark can run against (``--kafka``).
KAFKA_KINDS = ("embedded", "tansu", "apache")
#: Brokers of the ``apache`` cluster; its topics are replicated to all of them.
APACHE_BROKERS = 3


@contextmanager
def kafka_broker(kind: str) -> Iterator[Any]:
    """``embedded`` (librdkafka's mock cluster, ~5 MiB kept per partition), ``tansu``, or ``apache``
    (a 3-broker Apache Kafka cluster, KRaft, topics of replication factor 3 and min.insync.replicas 2)."""
    if kind == "embedded":
        with embedded_kafka() as broker:
            yield broker
    elif kind == "tansu":
        with TansuKafka(log_dir=tempfile.mkdtemp(prefix="crr-bench-tansu-")).start() as broker:
            yield broker
    elif kind == "apache":
        with ApacheKafka(APACHE_BROKERS, dir=tempfile.mkdtemp(prefix="crr-bench-apache-")) as broker:
            yield broker
    else:
        raise ValueError(f"unknown Kafka broker {kind!r} ({', '.join(KAFKA_KINDS)})")


def kafka_description(kind: str) -> str:
    """What the results say about the Kafka broker used."""
    if kind == "tansu":
        return "Tansu 0.6 (independent Kafka-protocol server, in-memory storage) in its own process"
    if kind == "apache":
        return (f"Apache Kafka {KAFKA_VERSION}, {APACHE_BROKERS} brokers (KRaft, one JVM each), "
                "topics of replication factor 3 and min.insync.replicas 2")
    return "embedded Kafka (librdkafka mock cluster, `dev-kafka`) in its own process"


def create_topics(broker: Any, names: list[str], partitions: int = 4) -> None:
    """Create ``names`` before a bridge subscribes (Tansu would not see them for minutes; Apache Kafka
    here creates none on first use). On the Apache cluster they are replicated to every broker."""
    for name in names:
        if isinstance(broker, ApacheKafka):
            broker.create_topic(name, partitions, config={"min.insync.replicas": str(broker.min_insync_replicas)})
        else:
            broker.create_topic(name, partitions)


def delete_topics(bootstrap: str, names: list[str]) -> None:
    """Delete ``names`` (best effort: the embedded broker cannot), so a sweep's backlogs do not pile up."""
    try:
        futures = kafka.new_admin({"bootstrap.servers": bootstrap}).delete_topics(names, operation_timeout=30)
        for future in futures.values():
            future.result(60)
    except Exception:  # noqa: BLE001 - a topic left behind costs memory or disk only
        return


#: The mock cluster keeps about the newest 5 MiB per partition and drops older data silently.
EMBEDDED_PARTITION_BYTES = 5 << 20


EMBEDDED_PARTITIONS = 4


def check_embedded_capacity(kind: str, count: int, mean_bytes: float) -> None:
    """Refuse a backlog the embedded broker would silently truncate (with a margin for batch headers)."""
    if kind != "embedded":
        return
    per_partition = count * (mean_bytes + 80) / EMBEDDED_PARTITIONS
    if per_partition > EMBEDDED_PARTITION_BYTES * 0.8:
        raise SystemExit(
            f"{count:,} ops of ~{mean_bytes:.0f} bytes is ~{per_partition / 2**20:.1f} MiB per partition: the "
            "embedded broker keeps only ~5 MiB per partition and would drop the oldest ops; use --kafka tansu "
            "or --kafka apache, or a smaller backlog"
        )


@contextmanager
def redis_server() -> Iterator[Any]:
    """A redis-server on a free port, without persistence, stopped on exit."""
    with RedisServer().start() as server:
        yield server




def rabbitmq_reachable(url: str = RABBITMQ_URL) -> str | None:
    """RabbitMQ's version if ``url`` answers within 3 s, else None."""
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=3) as connection:
            connection.ensure_connection(max_retries=1, timeout=3)
            return str(connection.connection.server_properties.get("version", "?"))
    except Exception:  # noqa: BLE001 - any failure means "not available here"
        return None


def bench_env(
    *, broker_url: str, bootstrap: str, target_url: str, topic: str, group: str, queue: str, spool: str,
    confirm: bool | None = None, batch_size: int | None = 1, batch_linger_ms: int | None = None,
    prefetch: int | None = None, high_water: int | None = None,
) -> dict[str, str]:
    """Environment for ``benchmarks/apps/bench_app.py`` (see its docstring)."""
    # Prepended, not replaced: ``PYTHONPATH=/tmp/crr-head python -m benchmarks...`` measures
    # another copy of the package (e.g. ``git archive`` of a commit) in every subprocess too.
    inherited = os.environ.get("PYTHONPATH")
    env = {
        "PYTHONPATH": os.pathsep.join([str(APPS_DIR), *([inherited] if inherited else [])]),
        "CRR_BENCH_BROKER_URL": broker_url,
        "CRR_BENCH_BOOTSTRAP": bootstrap,
        "CRR_BENCH_KAFKA_EXTRA": json.dumps(kafka_extra()),
        "CRR_BENCH_TARGET_URL": target_url,
        "CRR_BENCH_TOPIC": topic,
        "CRR_BENCH_GROUP": group,
        "CRR_BENCH_QUEUE": queue,
        "CRR_BENCH_SPOOL": spool,
    }
    if batch_size is not None:  # None: the package's default
        env["CRR_BENCH_BATCH_SIZE"] = str(batch_size)
    if confirm is not None:
        env["CRR_BENCH_CONFIRM"] = "1" if confirm else "0"
    if batch_linger_ms is not None:
        env["CRR_BENCH_BATCH_LINGER_MS"] = str(batch_linger_ms)
    if high_water is not None:
        env["CRR_BENCH_HIGH_WATER"] = str(high_water)
    if prefetch is not None:
        env["CRR_BENCH_PREFETCH"] = str(prefetch)
    return env


def bench_app(env: dict[str, str], name: str = "bench_app") -> Any:
    """The benchmark Celery app built in this process from ``env`` (what the subprocesses load)."""
    from .apps.bench_app import make_app

    return make_app(env, name=name)


def celery_worker(
    env: dict[str, str], queue: str, workdir: Path, *, concurrency: int = 2, loglevel: str = "INFO",
    pool: str = "prefork",
) -> Any:
    """``celery -A bench_app worker -Q queue -c N -P prefork`` (not started), as the tests run it.

    Started with :meth:`ManagedProcess.start` it is not waited for: the benchmarks time the
    work from the first result, so readiness does not need the INFO ``ready.`` log line.
    """
    argv = [
        sys.executable, "-m", "celery", "-A", "bench_app", "worker", "-Q", queue, "-c", str(concurrency),
        "-P", pool, "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", loglevel,
        "-n", f"bench-{queue}@%h",
    ]
    return ManagedProcess(argv, env=env, cwd=str(workdir), name="celery-worker", log_dir=workdir)
