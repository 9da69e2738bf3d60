"""A fixed bootstrap port for the development broker (``celery-redis-retry dev-kafka --port``).

librdkafka's mock cluster always listens on a port the system picks: none of its
properties (``test.mock.num.brokers``, ``test.mock.broker.rtt``) fixes it, and
``rd_kafka_mock_broker_set_host_port`` only changes the address the broker advertises,
not the one it listens on. So a restart would move the bootstrap address. A
:class:`PortForwarder` listens on the fixed port and relays each connection to the
broker: clients bootstrap through it, then connect to the address the broker
advertises (its own port), as with any Kafka cluster.
"""

from __future__ import annotations

import socket
import threading


class PortForwarder:
    """Relay every TCP connection made to ``127.0.0.1:port`` to ``target`` (``HOST:PORT``).

    :raises OSError: if the port cannot be bound (in use, say).
    """

    def __init__(self, port: int, target: str) -> None:
        host, _, target_port = target.rpartition(":")
        self.target = (host, int(target_port))
        self._listener = socket.create_server(("127.0.0.1", port))
        self.address = f"127.0.0.1:{port}"
        threading.Thread(target=self._accept, name="dev-kafka-port", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(source, sink), name="dev-kafka-relay", daemon=True).start()

    def close(self) -> None:
        """Stop accepting connections (those relayed end with the broker)."""
        self._listener.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy ``source`` to ``sink`` until either side closes; then close both."""
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for side in (source, sink):
            try:
                side.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            side.close()
