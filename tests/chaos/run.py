"""A chaos run from start to report: start everything, play the faults, stop the app, account.

Profiles (``CRR_CHAOS_PROFILE``):

``short``  every fault type once, about 100 writes/s (``make test``)
``long``   rounds of every fault type in a new order each, at least 104 faults and
           200,000 writes at 150/s (``make chaos``, 40-60 minutes here)
``soak``   500 writes/s for 30 minutes, a fault that restarts no bridge or worker every
           minute or two, memory and latency followed per 5 minutes (``make soak``)

Each fault is timed from the moment it is injected until the system has recovered: a
marker op captured at that moment on every target has been applied, and the ops not
yet ended (Kafka lag of the ops and waiting topics) are back to what they were before.
"""

from __future__ import annotations

import json
import random
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from celery_redis_retry import ops
from celery_redis_retry.testing import wait_until

from .accounting import Accounting, Auditor, superseded_in_logs
from .faults import FAULTS, RABBITMQ_FAULTS, SOAK_FAULTS
from .ledger import Ledger
from .stack import ChaosStack, wait_quiet
from .workload import PREFIX, Workload


@dataclass(frozen=True)
class Profile:
    name: str
    fault_types: tuple[str, ...]
    rounds: int = 1  # every fault type once per round, in a new order
    rate: float = 100.0  # app writes per second
    gap: tuple[float, float] = (1.0, 3.0)  # seconds between one fault's recovery and the next fault
    min_writes: int = 0  # publishing goes on after the last fault until the ledger holds this many
    duration: float = 0.0  # soak: run this long, faults drawn from fault_types all along
    recovery_timeout: float = 180.0


PROFILES = {
    "short": Profile("short", tuple(FAULTS)),
    "long": Profile("long", tuple(FAULTS), rounds=8, rate=150.0, min_writes=200_000),
    "soak": Profile("soak", SOAK_FAULTS, rate=500.0, gap=(45.0, 90.0), duration=1800.0),
}


def profile_for(name: str, broker: str, only: str = "") -> Profile:
    """The profile ``name`` for a run on ``broker``; ``only`` (comma-separated fault names) narrows its faults."""
    profile = PROFILES[name]
    if only:
        unknown = set(only.split(",")) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown fault types {sorted(unknown)}; known: {sorted(FAULTS)}")
        profile = replace(profile, fault_types=tuple(t for t in profile.fault_types if t in only.split(",")))
    if broker == "rabbitmq":
        types = tuple(t for t in profile.fault_types if t in RABBITMQ_FAULTS)
        return replace(profile, name=f"{profile.name}-rabbitmq", fault_types=types, min_writes=profile.min_writes // 4)
    return profile


@dataclass
class FaultRecord:
    name: str
    at_s: float  # since the run began
    detail: str = ""
    repair_s: float = 0.0  # injected -> repaired (killed -> restarted...)
    recovery_s: float | None = None  # injected -> recovered; None: not within the profile's timeout


@dataclass
class Samples:
    """What the samplers saw: memory per process and lag, every couple of seconds."""

    memory: list[tuple[float, str, int, float]] = field(default_factory=list)  # t, role, pid, MiB
    lag: list[tuple[float, int | None]] = field(default_factory=list)


class Run:
    """One chaos run on a started :class:`ChaosStack`."""

    def __init__(self, stack: ChaosStack, profile: Profile, seed: int) -> None:
        self.stack, self.profile, self.seed = stack, profile, seed
        self.rng = random.Random(seed)
        self.faults: list[FaultRecord] = []
        self.samples = Samples()
        self.began = time.time()
        self._stop = threading.Event()
        self._markers: list[tuple[str, str]] = []  # (target, key)

    # -- sampling --------------------------------------------------------------------------

    def _sample(self) -> None:
        while not self._stop.wait(2.0):
            now = time.time() - self.began
            sizes = self.stack.rss_mb()
            for role, process in self.stack.processes().items():
                if role in sizes and process.pid is not None:
                    self.samples.memory.append((now, role, process.pid, sizes[role]))
            self.samples.lag.append((now, self.stack.lag()))

    # -- the run ---------------------------------------------------------------------------

    def play(self) -> None:
        sampler = threading.Thread(target=self._sample, daemon=True)
        sampler.start()
        try:
            self._play_faults()
            self._publish_until(self.profile.min_writes)
        finally:
            self._stop.set()
            sampler.join(10)

    def schedule(self) -> list[str]:
        """Every fault type once per round, each round in a new order."""
        order: list[str] = []
        for _ in range(self.profile.rounds):
            round_ = list(self.profile.fault_types)
            self.rng.shuffle(round_)
            order += round_
        return order

    def _play_faults(self) -> None:
        if self.profile.duration:
            end = self.began + self.profile.duration
            while time.time() < end:
                time.sleep(min(self.rng.uniform(*self.profile.gap), max(0.0, end - time.time())))
                if time.time() < end:
                    self._inject(self.rng.choice(self.profile.fault_types))
            return
        for name in self.schedule():
            time.sleep(self.rng.uniform(*self.profile.gap))
            self._inject(name)

    def _inject(self, name: str) -> None:
        threshold = self._lag_threshold()
        markers = self._publish_markers(len(self.faults))
        injected = time.time()
        record = FaultRecord(name, round(injected - self.began, 1))
        print(f"[{record.at_s:7.1f}s] {name}", flush=True)
        record.detail = FAULTS[name](self.stack, self.rng)
        record.repair_s = round(time.time() - injected, 2)
        record.recovery_s = self._recovered(markers, injected, threshold)
        print(f"           {record.detail}; recovered in {record.recovery_s}s", flush=True)
        self.faults.append(record)

    def _lag_threshold(self) -> int:
        """What "back to normal" is: twice the lag of the last 10 s, and never under 2 s of writes."""
        recent = [lag for t, lag in self.samples.lag[-5:] if lag is not None]
        return max(2 * int(statistics.median(recent)) if recent else 0, int(2 * self.profile.rate), 100)

    def _publish_markers(self, n: int) -> list[tuple[str, str]]:
        """A few ``stamp`` ops on every target, captured right before the fault (their apply time is in Redis)."""
        producer = self.stack.loop.producer
        markers = [(target, f"{PREFIX}mark:{n}:{j}") for target in self._targets() for j in range(8)]
        for target, key in markers:
            producer.publish(ops.script("stamp", keys=[key]).with_target(target))
        self._markers += markers
        return markers

    def _targets(self) -> tuple[str, ...]:
        return ("default", *self.stack.loop.extra_targets)

    def _recovered(self, markers: list[tuple[str, str]], injected: float, threshold: int) -> float | None:
        """Seconds from ``injected`` until every marker is applied and the lag is at most ``threshold``
        (None: not within the profile's recovery timeout). Restarts what exited by itself meanwhile."""
        deadline = time.time() + self.profile.recovery_timeout
        applied: set[tuple[str, str]] = set()
        while time.time() < deadline:
            for what in self.stack.supervise():
                print(f"           supervisor: {what} exited by itself, started again", flush=True)
            applied |= {marker for marker in markers if marker not in applied and self._get(*marker) is not None}
            lag = self.stack.lag()
            if len(applied) == len(markers) and lag is not None and lag <= threshold:
                return round(time.time() - injected, 1)
            time.sleep(0.5)
        return None

    def _get(self, target: str, key: str) -> bytes | None:
        try:
            with self.stack.client_for(target) as client:
                value: bytes | None = client.get(key)
                return value
        except Exception:  # the target may be failing over right now
            return None

    def _publish_until(self, writes: int) -> None:
        if writes:
            wait_until(lambda: Ledger.read(self.stack.ledger_path).next_index >= writes, 7200, interval=5.0,
                       what=f"{writes} writes in the ledger")

    # -- the end ---------------------------------------------------------------------------

    def finish(self) -> Accounting:
        """Stop the app, wait until every op has ended, and account for every write."""
        self.stack.supervise()
        self.stack.stop_app()
        # What the app's producer took after SIGTERM went to its spool, as documented; an
        # operator (or the app's next start) drains it.
        drained = self.stack.loop.cli("redis-retry", "spool", "drain")
        assert drained.returncode == 0, drained.stdout + drained.stderr
        assert " 0 left" in drained.stdout, drained.stdout
        print(f"           {drained.stdout.strip()}", flush=True)
        assert self.stack.loop.producer.flush(60) == 0
        self.drain_s = wait_quiet(self.stack, 600)
        time.sleep(5)  # a late second copy of an op would land now
        ledger = Ledger.read(self.stack.ledger_path)
        dead = self.stack.loop.dead_letters(timeout=30, idle=5)
        logs = [w.log_text() for w in self.stack.all_workers]
        clients = {t: self.stack.client_for(t) for t in self._targets()}
        try:
            result = Auditor(Workload(self.seed, self._targets()), ledger, clients, dead,
                             superseded_in_logs(logs)).run()
            missing = [key for target, key in self._markers if self._get(target, key) is None]
        finally:
            for client in clients.values():
                client.close()
        result.lost += [f"marker {key} never applied" for key in missing]
        return result

    def report(self, result: Accounting, folder: Path) -> dict[str, Any]:
        """The run's report, written as ``chaos-report.json`` and ``chaos-report.md`` in ``folder``."""
        recoveries = [f.recovery_s for f in self.faults if f.recovery_s is not None]
        by_type: dict[str, list[float | None]] = {}
        for fault in self.faults:
            by_type.setdefault(fault.name, []).append(fault.recovery_s)
        document = {
            "profile": self.profile.name, "seed": self.seed, "broker": "rabbitmq" if self.stack.rabbitmq else "redis",
            "duration_s": round(time.time() - self.began), "drain_after_last_fault_s": round(self.drain_s, 1),
            "faults": len(self.faults),
            "faults_by_type": {name: len(times) for name, times in sorted(by_type.items())},
            "exited_by_themselves": self.stack.restarts,
            "recovery_s": {
                "p50": _percentile(recoveries, 50), "p99": _percentile(recoveries, 99),
                "max": max(recoveries, default=None),
                "not_recovered": sum(1 for f in self.faults if f.recovery_s is None),
                "max_by_type": {n: max((t for t in ts if t is not None), default=None) for n, ts in by_type.items()},
            },
            **result.summary(),
            "memory": memory_report(self.samples.memory),
            "latency": latency_report(result.latencies),
            "fault_log": [asdict(f) for f in self.faults],
        }
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "chaos-report.json").write_text(json.dumps(document, indent=2))
        (folder / "chaos-report.md").write_text(markdown(document))
        return document


def _percentile(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def memory_report(samples: list[tuple[float, str, int, float]]) -> dict[str, Any]:
    """Per role: peak MiB, restarts, and for the longest-lived process the drift after warm-up.

    Drift compares the median of the first 5 minutes after a 2-minute warm-up with the
    median of the last 5 minutes of the same process (the same pid).
    """
    roles: dict[str, dict[int, list[tuple[float, float]]]] = {}
    for t, role, pid, mb in samples:
        roles.setdefault(role, {}).setdefault(pid, []).append((t, mb))
    report: dict[str, Any] = {}
    for role, by_pid in sorted(roles.items()):
        longest = max(by_pid.values(), key=lambda s: s[-1][0] - s[0][0])
        start, end = longest[0][0] + 120, longest[-1][0]
        early = [mb for t, mb in longest if start <= t < start + 300]
        late = [mb for t, mb in longest if t >= end - 300]
        drift = None
        if end - start >= 600 and early and late:
            drift = round(100 * (statistics.median(late) / statistics.median(early) - 1), 1)
        windows: dict[int, list[float]] = {}
        for t, mb in longest:
            windows.setdefault(int(t // 300), []).append(mb)
        report[role] = {"peak_mb": round(max(mb for s in by_pid.values() for _, mb in s), 1),
                        "processes": len(by_pid), "drift_pct": drift,
                        # the longest-lived process's median per 5 minutes: a leak climbs, a warm-up levels off
                        "median_mb_per_5min": [round(statistics.median(v), 1) for _, v in sorted(windows.items())]}
    return report


def latency_report(latencies: list[tuple[float, float]]) -> dict[str, Any]:
    """Capture-to-applied seconds: p50/p99 overall and p99 per 5-minute window of capture time."""
    if not latencies:
        return {}
    first = min(created for created, _ in latencies)
    windows: dict[int, list[float]] = {}
    for created, seconds in latencies:
        windows.setdefault(int((created - first) // 300), []).append(seconds)
    values = [s for _, s in latencies]
    return {
        "count": len(values), "p50_s": _round(_percentile(values, 50)), "p99_s": _round(_percentile(values, 99)),
        "p99_per_5min_s": {f"{5 * w}-{5 * w + 5}min": _round(_percentile(v, 99)) for w, v in sorted(windows.items())},
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        f"# Chaos report: profile {doc['profile']}, seed {doc['seed']}, Celery broker {doc['broker']}",
        "",
        f"{doc['writes_certain']} writes captured for sure, {doc['writes_uncertain']} in flight when the app "
        f"was killed; {doc['faults']} faults in {doc['duration_s']} s; drained {doc['drain_after_last_fault_s']} s "
        "after the app stopped.",
        "",
        "| lost | applied twice | newer write overwritten | unknown in DLQ |",
        "| --- | --- | --- | --- |",
        f"| {doc['lost']} | {doc['doubled']} | {doc['overwritten']} | {doc['unknown_dead']} |",
        "",
        "## Outcomes",
        "",
        "| outcome | writes |",
        "| --- | --- |",
        *(f"| {name} | {count} |" for name, count in sorted(doc["outcomes"].items())),
        "",
        "## Faults and recovery (injected -> markers applied and lag back to normal)",
        "",
        f"p50 {doc['recovery_s']['p50']} s, p99 {doc['recovery_s']['p99']} s, max {doc['recovery_s']['max']} s, "
        f"not recovered {doc['recovery_s']['not_recovered']}",
        "",
        "| fault | times | slowest recovery (s) |",
        "| --- | --- | --- |",
        *(f"| {name} | {count} | {doc['recovery_s']['max_by_type'][name]} |"
          for name, count in doc["faults_by_type"].items()),
        "",
        f"Processes that exited by themselves and were started again (a supervisor's job): "
        f"{', '.join(doc['exited_by_themselves']) or 'none'}",
        "",
        "## Memory (MiB)",
        "",
        "| process | peak | processes (restarts + 1) | drift after warm-up | median per 5 min |",
        "| --- | --- | --- | --- | --- |",
        *(f"| {role} | {m['peak_mb']} | {m['processes']} | "
          f"{'-' if m['drift_pct'] is None else str(m['drift_pct']) + ' %'} | "
          f"{' '.join(str(v) for v in m['median_mb_per_5min'])} |" for role, m in doc["memory"].items()),
    ]
    latency = doc.get("latency") or {}
    if latency:
        lines += ["", "## Capture to applied (latency writes)", "",
                  f"{latency['count']} writes: p50 {latency['p50_s']} s, p99 {latency['p99_s']} s", "",
                  "| window | p99 (s) |", "| --- | --- |",
                  *(f"| {w} | {p} |" for w, p in latency["p99_per_5min_s"].items())]
    for kind in ("lost", "doubled", "overwritten", "unknown_dead"):
        if doc["examples"][kind]:
            lines += ["", f"## {kind}: examples", "", *(f"- {e}" for e in doc["examples"][kind])]
    return "\n".join(lines) + "\n"
