"""Shared helpers for the benchmarks: a broker in its own process, percentiles, the machine, results.

The broker always runs as a separate process (:class:`~celery_redis_retry.testing.EmbeddedKafka`,
the ``dev-kafka`` command): a broker inside the benchmark's own process would compete with
the code being measured for the GIL and for librdkafka's threads.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from celery_redis_retry.testing import EmbeddedKafka

RESULTS_DIR = Path(__file__).parent / "results"

#: Distributions whose versions explain a result.
_VERSIONS = ("celery-redis-retry", "confluent-kafka", "orjson", "msgspec", "celery", "kombu", "redis")


@contextmanager
def embedded_kafka() -> Iterator[EmbeddedKafka]:
    """An embedded broker (librdkafka's mock cluster) in a subprocess, stopped on exit."""
    with EmbeddedKafka(log_dir=tempfile.mkdtemp(prefix="crr-bench-kafka-")).start() as broker:
        yield broker


def percentiles(samples_ns: Sequence[int], points: Sequence[float] = (50, 90, 99)) -> dict[str, float]:
    """``{"p50": us, ..., "max": us, "mean": us}`` of nanosecond samples, by the nearest-rank method."""
    if not samples_ns:
        raise ValueError("no samples")
    ordered = sorted(samples_ns)
    count = len(ordered)
    out = {f"p{point:g}": ordered[max(0, math.ceil(point / 100 * count) - 1)] / 1000 for point in points}
    out["max"] = ordered[-1] / 1000
    out["mean"] = sum(ordered) / count / 1000
    return out


def timer_overhead_us(count: int) -> float:
    """Median cost in us of the two clock reads every sample includes."""
    clock = time.perf_counter_ns
    samples = [0] * count
    for i in range(count):
        t0 = clock()
        samples[i] = clock() - t0
    return statistics.median(samples) / 1000


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, OS, Python and library versions."""
    versions: dict[str, str | None] = {}
    for name in _VERSIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        import confluent_kafka

        versions["librdkafka"] = confluent_kafka.libversion()[0]
    except ImportError:
        versions["librdkafka"] = None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "versions": versions,
    }


def describe_machine(info: dict[str, Any]) -> str:
    """One line of :func:`machine` for the console and the markdown."""
    versions = ", ".join(f"{name} {version}" for name, version in info["versions"].items() if version)
    return (
        f"{info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), {info['os']}, {info['python']}; "
        f"{versions}; load average at the end {' '.join(f'{x:.2f}' for x in info['load_average'] or ())}"
    )


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; numbers are right-aligned."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.2f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    # A column of numbers (where "-" marks a missing one) is right-aligned.
    numeric = [
        all(isinstance(row[i], (int, float)) or row[i] == "-" for row in rows) for i in range(len(headers))
    ]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        padded = (v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric, strict=True))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if n else ("-" * (w + 2)) for w, n in zip(widths, numeric, strict=True))
    rule += "|"
    return "\n".join([line(headers), rule, *(line(r) for r in cells)])


def write_results(name: str, payload: dict[str, Any], markdown: str, json_path: str | None = None) -> tuple[Path, Path]:
    """Write ``payload`` as JSON and ``markdown`` beside it; return both paths.

    By default ``benchmarks/results/<name>.json`` and ``.md``; ``json_path`` moves both.
    """
    target = Path(json_path) if json_path else RESULTS_DIR / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    document = {"benchmark": name, "at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **payload}
    target.write_text(json.dumps(document, indent=2) + "\n")
    markdown_path = target.with_suffix(".md")
    markdown_path.write_text(markdown.rstrip() + "\n")
    return target, markdown_path


def publish_results(name: str, payload: dict[str, Any], markdown: str, json_path: str | None,
                    batch_size: int = 1) -> None:
    """Write and print the results of a run (measured at ``batch_size`` ops per task).

    One results file per batch size, so one-task-per-op and batched runs sit side by side.
    """
    json_file, md_file = write_results(name if batch_size == 1 else f"{name}-batch{batch_size}", payload, markdown,
                                       json_path)
    print()
    print(markdown)
    print(f"\nresults: {json_file}, {md_file}")


# -- real-process stacks for the bridge, worker and drain benchmarks (added with them) ------

#: Folder of the benchmarks' Celery apps (``celery -A bench_app`` runs with it on PYTHONPATH).
APPS_DIR = Path(__file__).parent / "apps"

#: RabbitMQ the benchmarks use when asked to (the same server the RabbitMQ tests use).
RABBITMQ_URL = os.environ.get("CRR_BENCH_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")


def kafka_extra() -> dict[str, Any]:
    """Consumer settings for fast group joins of the short-lived benchmark groups."""
    from celery_redis_retry.testing import TEST_CONSUMER_SETTINGS

    return {**TEST_CONSUMER_SETTINGS, "topic.metadata.refresh.interval.ms": 1000}


@contextmanager
def kafka_broker(kind: str) -> Iterator[Any]:
    """``embedded`` (librdkafka's mock cluster, ~5 MiB kept per partition) or ``tansu``, in a subprocess."""
    if kind == "embedded":
        with embedded_kafka() as broker:
            yield broker
    elif kind == "tansu":
        from celery_redis_retry.testing import TansuKafka

        with TansuKafka(log_dir=tempfile.mkdtemp(prefix="crr-bench-tansu-")).start() as broker:
            yield broker
    else:
        raise ValueError(f"unknown Kafka broker {kind!r} (embedded or tansu)")


def kafka_description(kind: str) -> str:
    """What the results say about the Kafka broker used."""
    if kind == "tansu":
        return "Tansu 0.6 (independent Kafka-protocol server, in-memory storage) in its own process"
    return "embedded Kafka (librdkafka mock cluster, `dev-kafka`) in its own process"


@contextmanager
def redis_server() -> Iterator[Any]:
    """A redis-server on a free port, without persistence, stopped on exit."""
    from celery_redis_retry.testing import RedisServer

    with RedisServer().start() as server:
        yield server


def rabbitmq_reachable(url: str = RABBITMQ_URL) -> str | None:
    """RabbitMQ's version if ``url`` answers within 3 s, else None."""
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=3) as connection:
            connection.ensure_connection(max_retries=1, timeout=3)
            return str(connection.connection.server_properties.get("version", "?"))
    except Exception:  # noqa: BLE001 - any failure means "not available here"
        return None


def server_versions() -> dict[str, str | None]:
    """Versions of the servers the benchmarks start (redis-server, Tansu) and of RabbitMQ if reachable."""
    import subprocess

    from celery_redis_retry.testing import redis_server_binary, tansu_binary

    def first_line(argv: list[str]) -> str | None:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr) else None

    out: dict[str, str | None] = {}
    try:
        out["redis-server"] = first_line([redis_server_binary(), "--version"])
    except Exception:  # noqa: BLE001
        out["redis-server"] = None
    try:
        out["tansu"] = first_line([tansu_binary(), "--version"])
    except Exception:  # noqa: BLE001
        out["tansu"] = None
    out["rabbitmq"] = rabbitmq_reachable()
    return out


def bench_env(
    *, broker_url: str, bootstrap: str, target_url: str, topic: str, group: str, queue: str, spool: str,
    confirm: bool | None = None, batch_size: int | None = 1, batch_linger_ms: int | None = None,
    prefetch: int | None = None, high_water: int | None = None,
) -> dict[str, str]:
    """Environment for ``benchmarks/apps/bench_app.py`` (see its docstring)."""
    # Prepended, not replaced: ``PYTHONPATH=/tmp/crr-head python -m benchmarks...`` measures
    # another copy of the package (e.g. ``git archive`` of a commit) in every subprocess too.
    inherited = os.environ.get("PYTHONPATH")
    env = {
        "PYTHONPATH": os.pathsep.join([str(APPS_DIR), *([inherited] if inherited else [])]),
        "CRR_BENCH_BROKER_URL": broker_url,
        "CRR_BENCH_BOOTSTRAP": bootstrap,
        "CRR_BENCH_KAFKA_EXTRA": json.dumps(kafka_extra()),
        "CRR_BENCH_TARGET_URL": target_url,
        "CRR_BENCH_TOPIC": topic,
        "CRR_BENCH_GROUP": group,
        "CRR_BENCH_QUEUE": queue,
        "CRR_BENCH_SPOOL": spool,
    }
    if batch_size is not None:  # None: the package's default
        env["CRR_BENCH_BATCH_SIZE"] = str(batch_size)
    if confirm is not None:
        env["CRR_BENCH_CONFIRM"] = "1" if confirm else "0"
    if batch_linger_ms is not None:
        env["CRR_BENCH_BATCH_LINGER_MS"] = str(batch_linger_ms)
    if high_water is not None:
        env["CRR_BENCH_HIGH_WATER"] = str(high_water)
    if prefetch is not None:
        env["CRR_BENCH_PREFETCH"] = str(prefetch)
    return env


def bench_app(env: dict[str, str], name: str = "bench_app") -> Any:
    """The benchmark Celery app built in this process from ``env`` (what the subprocesses load)."""
    from .apps.bench_app import make_app

    return make_app(env, name=name)


class QueueCounter:
    """Messages waiting in one Celery queue: LLEN on a Redis broker, a passive declare on RabbitMQ."""

    def __init__(self, app: Any, queue: str) -> None:
        from urllib.parse import urlsplit

        self.queue = queue
        self._redis: Any = None
        self._connection: Any = None
        url = str(app.conf.broker_url)
        if urlsplit(url).scheme in ("redis", "rediss"):
            import redis

            self._redis = redis.Redis.from_url(url)
        else:
            # The queue as Celery itself declares it when publishing (same exchange, durability).
            self._entity = app.amqp.queues[queue]
            self._connection = app.connection_for_write()
            self._connection.ensure_connection(max_retries=3)
            self._channel = self._connection.channel()
            self._entity(self._channel).declare()

    def count(self) -> int:
        if self._redis is not None:
            return int(self._redis.llen(self.queue))
        return int(self._channel.queue_declare(queue=self.queue, passive=True).message_count)

    def ops(self) -> int:
        """Ops held by the tasks in the queue (a ``replay_batch`` task holds several).

        Redis: read without removing. RabbitMQ: the messages are taken off the queue and
        their ops added to a running total, so call it once the queue stopped growing.
        """
        if self._redis is not None:
            return sum(ops_in_task(json.loads(raw)) for raw in self._redis.lrange(self.queue, 0, -1))
        while True:
            message = self._channel.basic_get(self.queue, no_ack=True)
            if message is None:
                return self._taken
            self._taken += _ops_in_body(message.headers.get("task"), message.body)

    _taken = 0

    def purge(self) -> None:
        if self._redis is not None:
            self._redis.delete(self.queue)
        else:
            self._channel.queue_purge(self.queue)

    def close(self, delete: bool = True) -> None:
        """Close; on RabbitMQ also delete the queue (benchmark queues have unique names)."""
        if self._redis is not None:
            if delete:
                self._redis.delete(self.queue)
            self._redis.close()
        else:
            if delete:
                with contextlib.suppress(Exception):  # best effort on a shared server
                    self._channel.queue_delete(self.queue)
            self._connection.release()


def ops_in_task(envelope: dict[str, Any]) -> int:
    """Ops in one task as kombu's Redis transport stores it (JSON envelope, base64 body)."""
    import base64

    body = envelope["body"]
    if envelope.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    return _ops_in_body(envelope.get("headers", {}).get("task"), body)


def _ops_in_body(task: str | None, body: bytes | str) -> int:
    if task == "celery_redis_retry.replay_batch":
        args = json.loads(body)[0]
        return len(args[0])
    return 1


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


def keys_applied(client: Any, expected: int, pattern: str) -> int:
    """Data keys in the target: DBSIZE while it is below ``expected`` (cheap), then a SCAN of ``pattern``.

    A replay also records a write stamp beside each key it writes (``crr:{<key>}:w``), so
    DBSIZE counts up to twice the data keys: below ``expected`` it is an upper bound, good
    for progress; only the SCAN says the work is done.
    """
    size = int(client.dbsize())
    if size < expected:
        return size
    return sum(1 for _ in client.scan_iter(match=pattern, count=10_000))


def rate(count: int, seconds: float) -> float:
    """``count / seconds``, 0 when no time passed."""
    return count / seconds if seconds > 0 else 0.0


#: The mock cluster keeps about the newest 5 MiB per partition and drops older data silently.
EMBEDDED_PARTITION_BYTES = 5 << 20
EMBEDDED_PARTITIONS = 4


def check_embedded_capacity(kind: str, count: int, mean_bytes: float) -> None:
    """Refuse a backlog the embedded broker would silently truncate (with a margin for batch headers)."""
    if kind != "embedded":
        return
    per_partition = count * (mean_bytes + 80) / EMBEDDED_PARTITIONS
    if per_partition > EMBEDDED_PARTITION_BYTES * 0.8:
        raise SystemExit(
            f"{count:,} ops of ~{mean_bytes:.0f} bytes is ~{per_partition / 2**20:.1f} MiB per partition: the "
            "embedded broker keeps only ~5 MiB per partition and would drop the oldest ops; use --kafka tansu "
            "or fewer --ops"
        )


# -- py-spy ------------------------------------------------------------------------------


def py_spy_binary() -> str | None:
    """py-spy beside this interpreter or on PATH (``pip install py-spy``), else None."""
    import shutil
    import sys

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
        import subprocess

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
        import signal
        import subprocess

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
    import re
    from collections import Counter

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


def celery_worker(
    env: dict[str, str], queue: str, workdir: Path, *, concurrency: int = 2, loglevel: str = "INFO",
    pool: str = "prefork",
) -> Any:
    """``celery -A bench_app worker -Q queue -c N -P prefork`` (not started), as the tests run it.

    Started with :meth:`ManagedProcess.start` it is not waited for: the benchmarks time the
    work from the first result, so readiness does not need the INFO ``ready.`` log line.
    """
    import sys

    from celery_redis_retry.testing import ManagedProcess

    argv = [
        sys.executable, "-m", "celery", "-A", "bench_app", "worker", "-Q", queue, "-c", str(concurrency),
        "-P", pool, "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", loglevel,
        "-n", f"bench-{queue}@%h",
    ]
    return ManagedProcess(argv, env=env, cwd=str(workdir), name="celery-worker", log_dir=workdir)


def prequeue(app: Any, queue: str, calls: Sequence[tuple[str, tuple[Any, ...], dict[str, Any]]],
             link_error: Any = None) -> float:
    """Send ``(task name, args, kwargs)`` tasks to ``queue`` as fast as the broker takes them; return seconds.

    On Redis the sends are pipelined with kombu's ``Producer.batch`` (kombu >= 5.7; others
    publish one by one), so filling a queue does not take as long as the run it prepares.
    """
    import contextlib
    import time

    start = time.perf_counter()
    with app.producer_or_acquire() as producer:
        batching = producer.batch(500) if hasattr(producer, "batch") else contextlib.nullcontext()
        with batching:
            for name, args, kwargs in calls:
                app.send_task(name, args=args, kwargs=kwargs, queue=queue, link_error=link_error, producer=producer)
    return time.perf_counter() - start


class ProcessSampler:
    """Samples VmRSS and CPU time of named processes every ``interval`` seconds in a thread.

    ``targets`` maps a label to a callable returning the pid to sample now (or None), so a
    worker's pool child can be looked up once it exists.
    """

    def __init__(self, targets: dict[str, Any], interval: float = 1.0) -> None:
        import threading

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
        import time

        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def sample_now(self) -> None:
        import time

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


def code_under_test() -> dict[str, Any]:
    """Which copy of celery_redis_retry is measured: its folder, the git commit if it is a checkout.

    The bridge and worker subprocesses run from a temporary folder with ``PYTHONPATH`` as
    :func:`bench_env` sets it, so they may import another copy than this process (where
    ``python -m`` puts the current folder first): both are recorded. ``CRR_BENCH_CODE_LABEL``
    adds a free-form label (e.g. "git archive of 2c526e6").
    """
    import subprocess
    import sys

    import celery_redis_retry

    def describe(folder: Path) -> dict[str, Any]:
        out: dict[str, Any] = {"package_path": str(folder), "git_head": None, "uncommitted_changes": None}
        try:
            head = subprocess.run(["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True, timeout=10, check=True).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--", "."],
                                   capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return out
        out["git_head"], out["uncommitted_changes"] = head, bool(dirty)
        return out

    env = {**os.environ, "PYTHONPATH": bench_env(broker_url="", bootstrap="", target_url="", topic="", group="",
                                                 queue="", spool="")["PYTHONPATH"]}
    found = subprocess.run(
        [sys.executable, "-c", "import celery_redis_retry, os; print(os.path.dirname(celery_redis_retry.__file__))"],
        capture_output=True, text=True, timeout=60, check=False, env=env, cwd=tempfile.gettempdir(),
    ).stdout.strip()
    here = Path(celery_redis_retry.__file__).resolve().parent
    subprocesses = Path(found).resolve() if found else here
    out = describe(subprocesses)
    out["label"] = os.environ.get("CRR_BENCH_CODE_LABEL")
    if subprocesses != here:
        out["in_benchmark_process"] = describe(here)
    return out


def describe_code(code: dict[str, Any]) -> str:
    """One line of :func:`code_under_test` for the markdown."""
    def one(part: dict[str, Any]) -> str:
        if part.get("git_head") is None:
            return f"celery_redis_retry from {part['package_path']}"
        state = "with uncommitted changes" if part.get("uncommitted_changes") else "clean"
        return f"celery_redis_retry from {part['package_path']} at {part['git_head']} ({state})"

    text = one(code) + (f" ({code['label']})" if code.get("label") else "")
    if code.get("in_benchmark_process"):
        text += f" in the bridge and worker; {one(code['in_benchmark_process'])} in the benchmark process"
    return text
