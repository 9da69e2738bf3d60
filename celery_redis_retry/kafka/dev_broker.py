"""The embedded development broker behind ``celery-redis-retry dev-kafka``: librdkafka's mock cluster.

For ``make demo`` and fast tests only: it keeps about 5 MiB per partition and drops older
data without a word, so nothing that must not be lost belongs on it.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile

from confluent_kafka import (
    Producer,
)

logger = logging.getLogger(__name__)


class EmbeddedBroker:
    """librdkafka's mock cluster, running inside this process, as a real Kafka broker.

    Other processes connect to :attr:`bootstrap_servers` like to any broker; topics are
    created on first use with 4 partitions. It keeps data in memory only, and about the
    newest 5 MiB per partition: for development, demos and tests, never production.
    """

    def __init__(self) -> None:
        self._handle: Producer | None = Producer(
            {
                "test.mock.num.brokers": 1,
                "bootstrap.servers": "unused:1",
                "logger": logging.getLogger("celery_redis_retry.dev_kafka"),
            }
        )
        brokers = Producer.list_topics(self._handle, timeout=10).brokers.values()
        self.bootstrap_servers = ",".join(f"{b.host}:{b.port}" for b in brokers)

    def close(self) -> None:
        """Stop serving (the mock cluster dies with its handle)."""
        self._handle = None


def serve_dev_broker(bootstrap_file: str | None = None, port: int | None = None) -> None:
    """Run an :class:`EmbeddedBroker` until SIGINT or SIGTERM; print its address first.

    With ``port``, clients bootstrap through ``127.0.0.1:port`` (see :mod:`.dev_port`).
    :raises OSError: if ``port`` cannot be bound.
    """
    from celery_redis_retry.kafka.dev_port import PortForwarder

    stop = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    broker = EmbeddedBroker()
    forwarder = PortForwarder(port, broker.bootstrap_servers) if port is not None else None
    bootstrap = forwarder.address if forwarder is not None else broker.bootstrap_servers
    print(f"bootstrap.servers={bootstrap}", flush=True)
    if bootstrap_file:
        folder = os.path.dirname(os.path.abspath(bootstrap_file))
        with tempfile.NamedTemporaryFile("w", dir=folder, delete=False) as out:
            out.write(bootstrap + "\n")
        os.replace(out.name, bootstrap_file)  # readers never see a half-written file
    try:
        received = signal.sigwait(stop)
        logger.info("dev-kafka: %s received, stopping", signal.Signals(received).name)
    finally:
        if forwarder is not None:
            forwarder.close()
        broker.close()
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
