"""Profiling with py-spy: record a running process, then sum up where its samples fell."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any


def py_spy_binary() -> str | None:
    """py-spy beside this interpreter or on PATH (``pip install py-spy``), else None."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


class PySpy:
    """``py-spy record --format raw`` attached to a running process until :meth:`stop`."""

    def __init__(
        self, pid: int, output: Path, *, idle: bool, subprocesses: bool = False, threads: bool = False,
        rate_hz: int = 250,
    ) -> None:
        binary = py_spy_binary()
        if binary is None:
            raise SystemExit("profiling needs py-spy: .venv/bin/pip install py-spy")
        self.output = output
        argv = [binary, "record", "--pid", str(pid), "--format", "raw", "--rate", str(rate_hz), "-o", str(output),
                "--nonblocking"]
        if idle:
            argv.append("--idle")
        if subprocesses:
            argv.append("--subprocesses")
        if threads:
            argv.append("--threads")
        self._log = open(output.with_suffix(".log"), "wb")  # noqa: SIM115 - closed in stop()
        self._popen = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT)

    def stop(self) -> Path:
        """SIGINT (py-spy writes its output then), wait, return the output path."""
        if self._popen.poll() is None:
            self._popen.send_signal(signal.SIGINT)
            try:
                self._popen.wait(30)
            except subprocess.TimeoutExpired:
                self._popen.kill()
                self._popen.wait()
        self._log.close()
        return self.output


def summarize_collapsed(path: Path, top: int = 25, *, within: str | None = None) -> dict[str, Any]:
    """Top functions of a py-spy ``raw`` (collapsed stacks) file: self and inclusive share of samples.

    Frames look like ``function (file.py:line)``; lines are folded so a function counts once
    per stack. With ``within``, only stacks holding a frame that starts with it count (e.g.
    ``"Bridge.run"``: the bridge's loop, not idle helper threads). Returns
    ``{"samples": n, "self": [[frame, pct], ...], "inclusive": [...]}``.
    """
    line_no = re.compile(r":\d+\)$")
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [line_no.sub(")", f) for f in stack.split(";") if f]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames or (within is not None and not any(f.startswith(within) for f in frames)):
            continue
        total += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count

    def share(counter: Counter[str]) -> list[list[Any]]:
        return [[frame, round(100 * n / total, 1)] for frame, n in counter.most_common(top)] if total else []

    return {"samples": total, "self": share(self_counts), "inclusive": share(inclusive)}
