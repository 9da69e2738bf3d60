"""One full drain of a backlog: publish it to a new topic, drain it with one bridge and one worker, then the raw row.

A :class:`Point` is everything that varies between the drains of a benchmark run (the
backlog, the targets, the replay and safety settings); :func:`run_point` measures one on
servers a run started once (:class:`Servers`). Every point gets its own topics, deleted
afterwards, and flushed targets.
"""

from __future__ import annotations

import json
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import redis

from celery_redis_retry.capture.producer import RetryProducer
from celery_redis_retry.config import Settings, waiting_topic_name
from celery_redis_retry.ops import RedisOp
from celery_redis_retry.testing import CeleryCommand

from .processes import ProcessSampler, children
from .stack import (
    bench_env,
    celery_worker,
    check_embedded_capacity,
    create_topics,
    delete_topics,
    kafka_broker,
    redis_server,
)
from .timing import rate
from .workload import AppliedTracker, Backlog, raw_pipelined, seed, target_names

#: The raw baseline's redis-py pipelines hold this many commands.
RAW_PIPELINE = 1000
#: "Flat after warm-up": RSS after warm-up stays within this many % of it.
RSS_GOAL_PCT = 10.0
#: Warm-up ends once this share of the backlog is applied: by then Kafka's prefetch, the
#: bridge's ops in flight, the Celery queue and the worker's prefetch have filled, and what
#: grows after it is what would keep growing.
WARM_SHARE = 0.2
POLL_INTERVAL = 0.1
#: The secret of ``redis_retry_signing_keys`` when a point signs its messages.
SIGNING_KEY = "bench-signing-key-0123456789abcdef"
PROCESSES = ("bridge", "worker main", "worker child")


@dataclass(frozen=True)
class Point:
    """The settings of one drain. None: the package's default."""

    ops: int
    mix: dict[str, float]
    targets: int = 1
    batch_size: int | None = None
    batch_linger_ms: int | None = None
    commit_after: str = "end"
    write_stamps: bool = True
    signing: bool = False
    durable_publish: bool = False
    concurrency: int = 2
    loglevel: str = "INFO"
    kafka_extra: dict[str, Any] = field(default_factory=dict)

    def with_(self, **changes: Any) -> Point:
        return replace(self, **changes)

    def backlog(self) -> Backlog:
        return Backlog(self.ops, self.mix, self.targets)

    def app_env(self) -> dict[str, str]:
        """The bench app's variables for what this point sets beyond :func:`bench_env`."""
        env = {"CRR_BENCH_COMMIT_AFTER": self.commit_after, "CRR_BENCH_WRITE_STAMPS": "1" if self.write_stamps else "0"}
        if self.signing:
            env["CRR_BENCH_SIGNING_KEY"] = SIGNING_KEY
        return env

    def producer_settings(self) -> dict[str, Any]:
        """What this point sets for the publishing ``RetryProducer``."""
        # The producer only checks that an op's target is configured; it never connects to one.
        settings: dict[str, Any] = {
            "redis_retry_durable_publish": self.durable_publish,
            "redis_retry_targets": dict.fromkeys(target_names(self.targets), "redis://127.0.0.1:1/0"),
        }
        if self.signing:
            settings["redis_retry_signing_keys"] = {"bench": SIGNING_KEY}
        return settings


@dataclass
class Servers:
    """What a run starts once: the Kafka broker, the Celery broker, ``targets`` target redis-servers, a folder."""

    kind: str
    kafka: Any
    celery_broker: Any
    targets: list[Any]
    workdir: Path

    @property
    def bootstrap(self) -> str:
        return str(self.kafka.bootstrap_servers)


@contextmanager
def servers(kind: str, targets: int) -> Iterator[Servers]:
    """Start the Kafka broker ``kind``, a Celery broker and ``targets`` target redis-servers; stop them on exit."""
    with ExitStack() as stack:
        print(f"starting {kind} Kafka and {targets + 1} redis-servers...", flush=True)
        kafka = stack.enter_context(kafka_broker(kind))
        celery_broker = stack.enter_context(redis_server())
        target_servers = [stack.enter_context(redis_server()) for _ in range(targets)]
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="crr-bench-drain-")))
        yield Servers(kind, kafka, celery_broker, target_servers, workdir)


def check_fits(kind: str, points: Iterable[Point]) -> None:
    """Refuse (SystemExit naming the backlog) before anything starts when a point does not fit the broker."""
    if kind != "embedded":
        return  # the others keep what they are sent
    for point in points:
        signer = producer_config("unused", "unused", Path(), point.producer_settings()).signer
        check_embedded_capacity(kind, point.ops, point.backlog().mean_message_bytes(200, signer))


def producer_config(bootstrap: str, topic: str, workdir: Path, settings: dict[str, Any] | None = None) -> Settings:
    """The settings of the publishing ``RetryProducer``: ``settings`` added to what reaches ``bootstrap``."""
    return Settings.from_mapping({
        "redis_retry_kafka": {"bootstrap.servers": bootstrap},
        "redis_retry_targets": {"default": "redis://127.0.0.1:1/0"},
        "redis_retry_topic": topic,
        "redis_retry_spool_path": str(workdir / f"publish-{uuid.uuid4().hex[:8]}.sqlite3"),
        **(settings or {}),
    })


def publish(bootstrap: str, topic: str, ops: Iterable[RedisOp], workdir: Path,
            settings: dict[str, Any] | None = None) -> tuple[int, float]:
    """Publish ``ops`` with ``RetryProducer`` (``settings`` added to its config); return how many and the time."""
    producer = RetryProducer(producer_config(bootstrap, topic, workdir, settings), handle_sigterm=False)
    count = 0
    start = time.perf_counter()
    for count, op in enumerate(ops, 1):
        producer.publish(op)
        if count % 50_000 == 0:  # librdkafka queues 100k messages at most; beyond that the producer spools
            producer.flush(120)
    left = producer.flush(120)
    elapsed = time.perf_counter() - start
    spooled = producer.stats.spooled
    producer.close(10)
    if left or spooled:
        raise SystemExit(f"publishing the backlog failed: {left} undelivered, {spooled} spooled")
    return count, elapsed


def run_point(servers: Servers, point: Point, timeout: float) -> dict[str, Any]:
    """Publish ``point``'s backlog to new topics, drain it, then the raw row on the same targets."""
    backlog = point.backlog()
    names = target_names(point.targets)
    topic = f"bench-drain-{uuid.uuid4().hex[:8]}"
    topics = [topic, f"{topic}.ends", f"{topic}.dlq", *(waiting_topic_name(topic, t) for t in names)]
    create_topics(servers.kafka, topics)
    clients = [redis.Redis.from_url(s.url) for s in servers.targets[:point.targets]]
    try:
        _, publish_s = publish(servers.bootstrap, topic, backlog.ops(), servers.workdir, point.producer_settings())
        print(f"published {point.ops:,} ops in {publish_s:.1f} s", flush=True)
        result = drain(servers, point, topic=topic, backlog=backlog, clients=clients, timeout=timeout)
        result["publish_s"] = publish_s
        result["publish_ops_s"] = rate(point.ops, publish_s)
        result["raw"] = raw_row(clients, backlog)
        result["ratio"] = result["ops_s"] / result["raw"]["ops_s"] if result["raw"]["ops_s"] else None
    finally:
        for client in clients:
            client.flushdb()
            client.close()
        delete_topics(servers.bootstrap, topics)
    return result


def raw_row(clients: list[redis.Redis], backlog: Backlog) -> dict[str, Any]:
    """The backlog's very commands with redis-py pipelines of :data:`RAW_PIPELINE`, on flushed targets."""
    commands = backlog.commands()
    for client in clients:
        client.flushdb()
    seed(clients, backlog)
    start = time.perf_counter()
    raw_pipelined(clients, commands, RAW_PIPELINE)
    seconds = time.perf_counter() - start
    applied = AppliedTracker(clients, backlog).count(exhaustive=True)
    return {"ops": backlog.count, "applied": applied, "seconds": seconds, "ops_s": rate(backlog.count, seconds)}


class _Child:
    """The first pool child of a worker, remembered once found (it stays the same child)."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.pid: int | None = None

    def __call__(self) -> int | None:
        if self.pid is None and self.worker.pid is not None:
            found = children(self.worker.pid)
            self.pid = found[0] if found else None
        return self.pid


def drain(servers: Servers, point: Point, *, topic: str, backlog: Backlog, clients: list[redis.Redis],
          timeout: float) -> dict[str, Any]:
    """Start a worker and a bridge over the filled topic; wait until every op is applied."""
    name = uuid.uuid4().hex[:8]
    queue = f"bench-drain-{name}"
    target_urls = [s.url for s in servers.targets[:point.targets]]
    env = bench_env(broker_url=servers.celery_broker.url, bootstrap=servers.bootstrap, target_url=target_urls[0],
                    topic=topic, group=f"bench-drain-{name}", queue=queue,
                    spool=str(servers.workdir / f"spool-{name}.sqlite3"), batch_size=point.batch_size,
                    batch_linger_ms=point.batch_linger_ms)
    env.update(point.app_env())
    env["CRR_BENCH_TARGETS"] = json.dumps(dict(zip(target_names(point.targets)[1:], target_urls[1:], strict=True)))
    if point.kafka_extra:
        env["CRR_BENCH_KAFKA_EXTRA"] = json.dumps({**json.loads(env["CRR_BENCH_KAFKA_EXTRA"]), **point.kafka_extra})
    broker = redis.Redis.from_url(servers.celery_broker.url)
    for client in clients:
        client.flushdb()
    seed(clients, backlog)
    tracker = AppliedTracker(clients, backlog)
    worker = celery_worker(env, queue, servers.workdir, concurrency=point.concurrency, loglevel=point.loglevel)
    bridge = CeleryCommand("bench_app", ["redis-retry", "bridge"], env=env, cwd=str(servers.workdir),
                           log_dir=servers.workdir)
    sampler = ProcessSampler({"bridge": lambda: bridge.pid, "worker main": lambda: worker.pid,
                              "worker child": _Child(worker)})
    try:
        launched = time.perf_counter()
        worker.start()
        bridge.start(ready_pattern=r"bridge consuming", timeout=120)
        sampler.start()
        progress, first, done = _wait_applied(tracker, broker, queue, processes=(bridge, worker), launched=launched,
                                              sampler=sampler, timeout=timeout)
    finally:
        rss = sampler.stop() if sampler._thread.is_alive() else {}
        for process in (bridge, worker):
            if process.running:
                process.stop(timeout=30)
    applied = tracker.count(exhaustive=True)
    errors = sum(p.log_text().count("ERROR") for p in (bridge, worker))
    broker.delete(queue)
    broker.close()
    first_t, first_c = first if first else (done, 0)
    for part in rss.values():
        part["late_growth_pct"] = late_growth(part.get("samples", []))
        growth = part.get("warm_growth_pct")
        part["flat"] = None if growth is None else growth <= RSS_GOAL_PCT
    return {
        "point": asdict(point), "ops": point.ops, "applied": applied, "all_applied": applied == point.ops,
        "launch_to_done_s": done - launched, "launch_to_first_s": first_t - launched, "first_to_last_s": done - first_t,
        "ops_s": rate(point.ops, done - launched),
        # None: every op was already applied when the first was seen (a backlog smaller than one poll's work).
        "ops_s_first_to_last": rate(applied - first_c, done - first_t) if applied > first_c else None,
        "celery_queue_peak": max((p["celery_queue"] for p in progress), default=0), "error_log_lines": errors,
        "rss": rss, "flat": flat_verdict(rss), "progress": progress,
        "bridge_log": str(bridge.log_path), "worker_log": str(worker.log_path),
    }


def _wait_applied(
    tracker: AppliedTracker, broker: redis.Redis, queue: str, *, processes: tuple[Any, ...], launched: float,
    sampler: ProcessSampler, timeout: float,
) -> tuple[list[dict[str, Any]], tuple[float, int] | None, float]:
    """Poll until every op is applied: progress once a second, (time, count) of the first applied, the end."""
    progress: list[dict[str, Any]] = []
    first: tuple[float, int] | None = None
    warm = False
    next_progress = 0.0
    deadline = time.monotonic() + timeout
    while True:
        applied = tracker.count()
        now = time.perf_counter()
        if applied and first is None:
            first = (now, applied)
        if not warm and applied >= WARM_SHARE * tracker.total:
            warm = True
            sampler.mark_warm()
        if now >= next_progress or tracker.done:
            progress.append({"t": round(now - launched, 2), "applied": applied,
                             "celery_queue": int(broker.llen(queue))})
            next_progress = now + 1.0
        if tracker.done:
            break
        for process in processes:
            if not process.running:
                raise SystemExit(f"{process.name} exited ({process.returncode}):\n{process.log_tail()}")
        if time.monotonic() > deadline:
            print(f"timed out after {timeout:g} s with {applied:,} of {tracker.total:,} applied", flush=True)
            break
        time.sleep(POLL_INTERVAL)
    done = time.perf_counter()
    sampler.sample_now()
    return progress, first, done


def late_growth(samples: list[dict[str, Any]]) -> float | None:
    """RSS growth in the second half of the drain over the first half's peak, in %.

    The first seconds fill librdkafka's fetch queue and Python's allocator; growth that
    goes on after them is what an unbounded buffer would look like.
    """
    if len(samples) < 4:
        return None
    half = len(samples) // 2
    early, late = max(s["rss_kib"] for s in samples[:half]), max(s["rss_kib"] for s in samples[half:])
    return round(100.0 * (late - early) / early, 1)


def flat_verdict(rss: dict[str, dict[str, Any]]) -> str:
    """``"met"``, or ``"MISSED (bridge, ...)"`` naming the processes that grew more than the goal after warm-up."""
    missed = [name for name in PROCESSES if rss.get(name, {}).get("flat") is False]
    unknown = [name for name in PROCESSES if rss.get(name, {}).get("flat") is None]
    if missed:
        return f"MISSED ({', '.join(missed)})"
    return f"met ({', '.join(unknown)} not measured)" if unknown else "met"
