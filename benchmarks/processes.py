"""Processes seen from ``/proc``: memory and CPU time, children, and sampling both over a run."""

from __future__ import annotations

import os
import threading
import time
from typing import Any


def proc_status(pid: int) -> dict[str, int] | None:
    """VmRSS (KiB) and CPU time (ms, user + system) of a live process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            rss = next((int(line.split()[1]) for line in status if line.startswith("VmRSS:")), 0)
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, StopIteration, ValueError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return {"rss_kib": rss, "cpu_ms": (int(fields[11]) + int(fields[12])) * 1000 // ticks}


def children(pid: int) -> list[int]:
    """Direct child process ids of ``pid`` (from /proc, oldest first)."""
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as listing:
                found.extend(int(x) for x in listing.read().split())
    except OSError:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as stat:
                        if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                            found.append(int(entry))
                except (OSError, ValueError, IndexError):
                    continue
    return sorted(set(found))


class ProcessSampler:
    """Samples VmRSS and CPU time of named processes every ``interval`` seconds in a thread.

    ``targets`` maps a label to a callable returning the pid to sample now (or None), so a
    worker's pool child can be looked up once it exists.
    """

    def __init__(self, targets: dict[str, Any], interval: float = 1.0) -> None:
        self.targets = targets
        self.interval = interval
        self.samples: dict[str, list[dict[str, Any]]] = {label: [] for label in targets}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._t0 = 0.0
        self._warm: dict[str, int] = {}

    def mark_warm(self) -> None:
        """Take a sample now and count growth from it ("warm": e.g. once the first op was applied)."""
        self.sample_now()
        self._warm = {label: len(samples) - 1 for label, samples in self.samples.items() if samples}

    def start(self) -> ProcessSampler:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def sample_now(self) -> None:
        now = time.monotonic() - self._t0
        for label, find in self.targets.items():
            pid = find()
            status = proc_status(pid) if pid else None
            if status is not None:
                self.samples[label].append({"t": round(now, 2), "pid": pid, **status})

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample_now()
            self._stop.wait(self.interval)

    def stop(self) -> dict[str, dict[str, Any]]:
        """Stop; return per label: samples, and start/peak/end RSS in MiB and growth in %."""
        self._stop.set()
        self._thread.join()
        out: dict[str, dict[str, Any]] = {}
        for label, samples in self.samples.items():
            if not samples:
                out[label] = {"samples": []}
                continue
            rss = [s["rss_kib"] / 1024 for s in samples]
            out[label] = {
                "start_mib": round(rss[0], 1), "peak_mib": round(max(rss), 1), "end_mib": round(rss[-1], 1),
                "growth_pct": round(100 * (max(rss) - rss[0]) / rss[0], 1) if rss[0] else None,
                "samples": samples,
            }
            warm = self._warm.get(label)
            if warm is not None and rss[warm]:
                out[label]["warm_mib"] = round(rss[warm], 1)
                out[label]["warm_growth_pct"] = round(100 * (max(rss[warm:]) - rss[warm]) / rss[warm], 1)
        return out
