"""A RabbitMQ broker run as a plain process: no service manager, no system-wide state but epmd."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from kombu.connection import Connection

from celery_redis_retry.testing.processes import ManagedProcess, free_port
from celery_redis_retry.testing.redis_servers import _find_binary

if TYPE_CHECKING:
    from typing_extensions import Self

#: Where Debian's rabbitmq-server package puts the real start script.
DEBIAN_SBIN = "/usr/sbin/rabbitmq-server"


def _unwrapped(path: str | None) -> str | None:
    # Debian's /usr/sbin/rabbitmq-server is a wrapper that, run as root, re-runs the real
    # script as the `rabbitmq` user from /var/lib/rabbitmq with its own HOME: that user
    # cannot write our temporary folders, and the logs go to /var/log. The real script
    # lies beside the wrapper.
    if path is None:
        return None
    resolved = Path(path).resolve()
    if resolved.name == "rabbitmq-script-wrapper":
        return str(resolved.parent / "rabbitmq-server")
    return path


def _candidates() -> Iterator[str | None]:
    yield _unwrapped(shutil.which("rabbitmq-server"))
    yield _unwrapped(DEBIAN_SBIN)


def rabbitmq_server_binary() -> str:
    """Path of a ``rabbitmq-server``: ``$CRR_RABBITMQ_SERVER``, else ``PATH``, else Debian's.

    Debian's root-only wrapper is replaced by the script it wraps (see :class:`RabbitMQServer`).

    :raises HarnessError: if none is found (the message says how to install one).
    """
    return _find_binary(
        "CRR_RABBITMQ_SERVER", _candidates(),
        "no rabbitmq-server found: install it (Debian/Ubuntu: `apt-get install rabbitmq-server`; "
        "its service need not run, the harness starts its own), or set CRR_RABBITMQ_SERVER to its path",
    )


class RabbitMQServer(ManagedProcess):
    """``rabbitmq-server`` on 127.0.0.1 as a plain process, with everything in its own folder.

    It listens for AMQP on ``port`` (a free one by default) and for Erlang distribution on
    ``dist_port`` (also free by default), with node name ``crr-<port>@localhost``, so
    several instances run side by side and beside a system RabbitMQ. Its database, logs,
    config, plugin list (empty) and Erlang cookie (``HOME``) live in ``dir``, a temporary
    folder by default; a :meth:`restart` keeps them, so durable queues survive it. The
    ``guest`` user may log in from 127.0.0.1.

    :meth:`stop` and :meth:`kill` end the start script, the Erlang VM and its helper
    processes (one process group). The Erlang port mapper ``epmd``, which the first
    Erlang node on the machine starts as a daemon outside that group and every later node
    shares, is left running: stopping it could break another node that uses it.
    """

    def __init__(
        self, port: int | None = None, *, dist_port: int | None = None, dir: str | None = None,  # noqa: A002
        binary: str | None = None,
    ) -> None:
        self.port = port or free_port()
        self.dist_port = dist_port or free_port()
        self.dir = Path(dir or tempfile.mkdtemp(prefix="crr-rabbitmq-"))
        self.node_name = f"crr-{self.port}@localhost"
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "loopback_users = none\n"
            "distribution.listener.interface = 127.0.0.1\n"
            f"distribution.listener.port_range.min = {self.dist_port}\n"
            f"distribution.listener.port_range.max = {self.dist_port}\n"
        )
        folder = str(self.dir)
        env = {
            "HOME": folder,
            "RABBITMQ_NODENAME": self.node_name,
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": f"{folder}/mnesia",
            "RABBITMQ_LOG_BASE": f"{folder}/log",
            # The broker's own log goes to stdout, so the harness log (and the tail in a
            # start failure) shows it.
            "RABBITMQ_LOGS": "-",
            "RABBITMQ_CONFIG_FILE": f"{folder}/rabbitmq",
            "RABBITMQ_ENABLED_PLUGINS_FILE": f"{folder}/enabled_plugins",
            "RABBITMQ_PID_FILE": f"{folder}/pid",
        }
        super().__init__(
            [binary or rabbitmq_server_binary()], env=env, cwd=folder, name=f"rabbitmq-{self.port}", log_dir=folder
        )

    @property
    def url(self) -> str:
        """``amqp://guest:guest@127.0.0.1:PORT//`` (the default vhost)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def start(self, timeout: float = 90.0) -> Self:
        """Launch and wait until an AMQP connection (login included) succeeds.

        A first start creates the database, ~5-10 s on two cores; allow for a slow machine.

        :raises ProcessExitedError: if it exits (the message carries its log tail).
        :raises HarnessTimeoutError: if no connection succeeds within ``timeout`` seconds.
        """
        return self._start_and_wait(
            lambda: self.wait_until(self.connectable, timeout, f"an AMQP connection to 127.0.0.1:{self.port}")
        )

    def connectable(self) -> bool:
        """Whether an AMQP connection and login succeed right now."""
        try:
            # kombu's Connection has no annotations on its constructor.
            with Connection(self.url, connect_timeout=1.0) as connection:  # type: ignore[no-untyped-call]
                connection.connect()
        except Exception:  # noqa: BLE001 - refused, reset or not yet accepting logins: not ready
            return False
        return True

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (RabbitMQ's clean shutdown), SIGKILL after ``timeout`` s; return the exit code."""
        return super().stop(timeout)
