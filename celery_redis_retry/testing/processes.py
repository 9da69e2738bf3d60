"""Managed subprocesses: the base every harness process is built on."""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from celery_redis_retry.errors import HarnessError, HarnessTimeoutError, ProcessExitedError

if TYPE_CHECKING:
    from types import TracebackType

    from typing_extensions import Self

T = TypeVar("T")

_TAIL_LINES = 40


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    return free_ports(1)[0]


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ports:
            return int(ports.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def quiet_port(low: int = 10000, room: int = 0) -> int:
    """A free TCP port on 127.0.0.1 below the OS's ephemeral range (and ``port + room`` too).

    For a server that is killed while clients keep reconnecting: a port inside the
    ephemeral range can be handed to a client as its own source port, and the client then
    connects to itself (TCP simultaneous open) and reads its own command back as a reply.
    """
    high = _ephemeral_low() - room
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(low, high)
        if _bindable(port) and (not room or _bindable(port + room)):
            return port
    raise HarnessError(f"no free port in {low}-{high}")


def free_ports(count: int) -> list[int]:
    """``count`` different TCP ports on 127.0.0.1 that were free a moment ago.

    Each socket stays bound until all are picked, so the OS cannot hand out one twice.
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


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

    def kill_leader(self) -> None:
        """SIGKILL the process itself, not its group: its children live on as orphans, as when
        the OOM killer picks a Celery worker's main process. :meth:`kill` or :meth:`stop`
        afterwards ends the rest of the group, as a supervisor would."""
        if self.running:
            assert self._popen is not None
            os.kill(self._popen.pid, signal.SIGKILL)
            self._popen.wait()

    def children(self) -> list[int]:
        """The pids of the process's direct children (a prefork pool's processes), from /proc.

        Every thread's list: a child forked by a thread other than the main one is listed
        under that thread."""
        if not self.running:
            return []
        found: list[int] = []
        with contextlib.suppress(OSError):  # the process ended while being read
            for thread in os.listdir(f"/proc/{self.pid}/task"):
                with contextlib.suppress(OSError):
                    found += [int(pid) for pid in Path(f"/proc/{self.pid}/task/{thread}/children").read_text().split()]
        return sorted(set(found))

    def rss_kib(self) -> int:
        """Resident memory of the process and its direct children together, in KiB (0 once it ended)."""
        if not self.running or self.pid is None:
            return 0
        return sum(_rss_kib(pid) for pid in (self.pid, *self.children()))

    def pause(self) -> None:
        """SIGSTOP the whole group: it holds its connections and sockets but answers nothing (a hung process)."""
        if self.running:
            self._signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused group."""
        if self.running:
            self._signal_group(signal.SIGCONT)

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


def _rss_kib(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


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
