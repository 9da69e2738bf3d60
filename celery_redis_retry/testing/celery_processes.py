"""``celery worker`` and other long-running ``celery`` commands as managed processes."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from celery_redis_retry.testing.processes import ManagedProcess

if TYPE_CHECKING:
    from typing_extensions import Self


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
