"""Benchmark: the bridge's dispatch rate (Kafka -> Celery broker queue) against raw ``send_task``.

A topic is pre-filled with ``--ops`` realistic ops (the SETs of ``bench_publish``, ~390-byte
messages). Then, for every Celery broker:

* ``bridge``: the real bridge, ``celery -A bench_app redis-retry bridge``, as a subprocess with
  a fresh consumer group, over the pre-filled topic. No worker runs: the benchmark counts the
  tasks landing in the Celery queue (``LLEN`` on a Redis broker, a passive ``queue_declare`` on
  RabbitMQ) every few milliseconds and times the first to the last landing;
* ``raw send_task``: this process sends the very same task with the very same arguments
  (``celery_redis_retry.replay``, the message text, the origin, ``queue=``, ``link_error=``)
  with ``app.send_task`` in a loop, timed from the first call until all of them are in the queue.

Both sides load the same app (``benchmarks/apps/bench_app.py``) with the same environment,
so the difference is what the bridge adds: consuming, decoding, verifying, offset storage.

Brokers: a Redis the benchmark starts, and RabbitMQ on 127.0.0.1:5672 (guest/guest; skipped
when unreachable) with publisher confirms (what the bridge turns on for amqp) and, for
reference, without (an explicit ``confirm_publish=False`` in the app, which the bridge keeps).

Goal: bridge >= 0.9x raw send_task with the same broker.

``--profile`` runs the bridge on the Redis broker under py-spy (wall clock, idle included)
and prints its top functions instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery_redis_retry import message
from celery_redis_retry.config import Settings
from celery_redis_retry.names import DEAD_LETTER_TASK, REPLAY_BATCH_TASK, REPLAY_TASK
from celery_redis_retry.testing import CeleryCommand

from .bench_publish import build_ops
from .drain_point import publish
from .machine import code_under_test, describe_code, describe_machine, machine, server_versions
from .output import RESULTS_DIR, markdown_table, publish_results
from .processes import proc_status
from .profiling import PySpy, summarize_collapsed
from .queues import QueueCounter
from .stack import (
    RABBITMQ_URL,
    bench_app,
    bench_env,
    check_embedded_capacity,
    kafka_broker,
    kafka_description,
    rabbitmq_reachable,
    redis_server,
)
from .timing import rate

NAME = "bench_bridge"
GOAL_RATIO = 0.9
POLL_INTERVAL = 0.005
#: A run fails when the queue stops growing for this long.
STALL_TIMEOUT = 30.0
#: With batches, the queue is counted in ops once it has not grown for this long.
SETTLE = 1.5
WARMUP = 200


@dataclass(frozen=True)
class Scenario:
    label: str
    broker: str  # "redis" or "amqp"
    confirm: bool | None

    @property
    def key(self) -> str:
        return self.label.replace(", ", "-").replace(" ", "-")


SCENARIOS = (
    Scenario("redis", "redis", None),
    Scenario("rabbitmq, confirms", "amqp", True),
    Scenario("rabbitmq, no confirms", "amqp", False),
)


@dataclass
class Stack:
    """What every run shares: Kafka with the pre-filled topic, the Redis broker, a work folder."""

    bootstrap: str
    topic: str
    redis_url: str
    workdir: Path
    messages: list[str]
    #: ``redis_retry_batch_size``: 1 sends one ``replay`` task per op, more sends ``replay_batch`` tasks.
    batch_size: int = 1

    def env(self, scenario: Scenario, queue: str, group: str) -> dict[str, str]:
        broker_url = self.redis_url if scenario.broker == "redis" else RABBITMQ_URL
        return bench_env(
            broker_url=broker_url, bootstrap=self.bootstrap, target_url=self.redis_url.rsplit("/", 1)[0] + "/1",
            topic=self.topic, group=group, queue=queue, spool=str(self.workdir / f"spool-{queue}.sqlite3"),
            confirm=scenario.confirm, batch_size=self.batch_size,
            # No worker runs here: the whole backlog must land in the queue, so no backpressure.
            high_water=0,
        )

    def calls(self) -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
        """The tasks the bridge sends for these messages: ``(name, args, kwargs)``, as ``Bridge._send`` builds them."""
        topic, size = self.topic, self.batch_size
        if size == 1:
            return [(REPLAY_TASK, (text,), {"origin": {"topic": topic, "partition": i % 4, "offset": i}})
                    for i, text in enumerate(self.messages)]
        return [
            (REPLAY_BATCH_TASK, (self.messages[first:first + size],
                                 [[topic, i % 4, i] for i in range(first, min(first + size, len(self.messages)))]), {})
            for first in range(0, len(self.messages), size)
        ]


def prefill(bootstrap: str, topic: str, count: int, workdir: Path) -> tuple[list[str], float]:
    """Publish ``count`` ops with ``RetryProducer``; return their messages (as the bridge sends them) and the time."""
    items = build_ops(count)
    _, elapsed = publish(bootstrap, topic, items, workdir)
    return [message.encode(op).decode() for op in items], elapsed


def _timeline_rates(samples: list[tuple[float, int]], total: int) -> dict[str, float]:
    """First-to-last landing rate and the steady rate between 10% and 90% of ``total``."""
    landed = [(t, c) for t, c in samples if c > 0]
    t_first, c_first = landed[0]
    t_last, c_last = next((t, c) for t, c in landed if c >= total)
    low = next((t, c) for t, c in landed if c >= total * 0.1)
    high = next((t, c) for t, c in landed if c >= total * 0.9)
    return {
        "first_to_last_s": t_last - t_first,
        "ops_s": rate(c_last - c_first, t_last - t_first),
        "steady_10_90_ops_s": rate(high[1] - low[1], high[0] - low[0]),
    }


def run_raw(stack: Stack, scenario: Scenario) -> dict[str, Any]:
    """``app.send_task`` of the bridge's tasks for every message from this process, as the bridge calls it."""
    queue = f"bench-raw-{uuid.uuid4().hex[:8]}"
    app = bench_app(stack.env(scenario, queue, "unused"), name=f"raw-{queue}")
    counter = QueueCounter(app, queue)
    errback = app.signature(DEAD_LETTER_TASK)
    send_task = app.send_task
    calls = stack.calls()
    try:
        warmup = calls[: max(1, WARMUP // stack.batch_size)]
        for name, args, kwargs in warmup:  # connection, queue declaration, caches
            send_task(name, args=args, kwargs=kwargs, queue=queue, link_error=errback)
        _wait_count(counter, len(warmup), None)
        counter.purge()
        cpu0, start = time.process_time(), time.perf_counter()
        for name, args, kwargs in calls:
            send_task(name, args=args, kwargs=kwargs, queue=queue, link_error=errback)
        sent = time.perf_counter()
        cpu = time.process_time() - cpu0
        landed_at = _wait_count(counter, len(calls), None)
        final = counter.ops()
    finally:
        counter.close()
    total = len(stack.messages)
    seconds = landed_at - start
    return {
        "ops": total, "tasks": len(calls), "landed": final, "seconds": seconds, "ops_s": rate(total, seconds),
        "send_loop_s": sent - start, "cpu_us_per_op": cpu * 1e6 / total,
    }


def _wait_count(counter: QueueCounter, total: int, process: CeleryCommand | None) -> float:
    """Poll until the queue holds ``total``; return when it did."""
    last, changed = -1, time.monotonic()
    while True:
        count = counter.count()
        now = time.perf_counter()
        if count >= total:
            return now
        if count != last:
            last, changed = count, time.monotonic()
        elif time.monotonic() - changed > STALL_TIMEOUT:
            tail = f"\nbridge log {process.log_path}:\n{process.log_tail()}" if process else ""
            raise SystemExit(f"the queue stopped at {count} of {total} for {STALL_TIMEOUT:g} s{tail}")
        if process is not None and not process.running:
            raise SystemExit(f"the bridge exited ({process.returncode}); log {process.log_path}:\n{process.log_tail()}")
        time.sleep(POLL_INTERVAL)


def run_bridge(stack: Stack, scenario: Scenario, profile_to: Path | None = None) -> dict[str, Any]:
    """The real bridge over the pre-filled topic, with a new consumer group and queue."""
    name = uuid.uuid4().hex[:8]
    queue, group = f"bench-bridge-{name}", f"bench-bridge-{name}"
    env = stack.env(scenario, queue, group)
    counter = QueueCounter(bench_app(env, name=f"counter-{name}"), queue)
    bridge = CeleryCommand("bench_app", ["redis-retry", "bridge"], env=env, cwd=str(stack.workdir),
                           log_dir=stack.workdir)
    total = len(stack.messages)
    spy = None
    try:
        launched = time.perf_counter()
        bridge.start(ready_pattern=r"bridge consuming", timeout=90)
        assert bridge.pid is not None
        samples: list[tuple[float, int]] = []
        proc_first: dict[str, int] | None = None
        proc_last: dict[str, int] = {}
        last, changed = -1, time.perf_counter()
        while True:
            count = counter.count()
            now = time.perf_counter()
            samples.append((now, count))
            if count and proc_first is None:
                proc_first = proc_status(bridge.pid)
                if profile_to is not None:  # from the first landing: the group join is not the hot path
                    spy = PySpy(bridge.pid, profile_to, idle=True, threads=True, rate_hz=500)
            if count != last:
                last, changed = count, now
                proc_last = proc_status(bridge.pid) or proc_last
            if stack.batch_size == 1 and count >= total:
                break
            # Batches: tasks hold a varying number of ops; once the queue stops growing, count them.
            if stack.batch_size > 1 and count and now - changed > SETTLE and counter.ops() >= total:
                samples = [(t, c) for t, c in samples if t <= changed]
                break
            if now - changed > STALL_TIMEOUT:
                raise SystemExit(f"the queue stopped at {count} tasks for {total} ops; bridge log "
                                 f"{bridge.log_path}:\n{bridge.log_tail()}")
            if not bridge.running:
                raise SystemExit(f"the bridge exited ({bridge.returncode}):\n{bridge.log_tail()}")
            time.sleep(POLL_INTERVAL)
        if spy is not None:
            spy.stop()
        code = bridge.stop(timeout=30)
        time.sleep(0.2)
        final = counter.ops()
        tasks = samples[-1][1]
    finally:
        if spy is not None:
            spy.stop()
        if bridge.running:
            bridge.kill()
        counter.close()
    # Timeline in ops: tasks times the mean ops per task (exact for one task per op).
    per_task = total / tasks
    rates = _timeline_rates([(t, round(c * per_task)) for t, c in samples], total)
    first_seen = next(t for t, c in samples if c > 0)
    cpu_ms = proc_last.get("cpu_ms", 0) - (proc_first or {}).get("cpu_ms", 0)
    return {
        "ops": total, "tasks": tasks, "landed": final, "seconds": rates["first_to_last_s"], "ops_s": rates["ops_s"],
        "steady_10_90_ops_s": rates["steady_10_90_ops_s"], "launch_to_first_s": first_seen - launched,
        "cpu_us_per_op": cpu_ms * 1000 / total, "rss_kib_end": proc_last.get("rss_kib"), "exit_code": code,
        "log": str(bridge.log_path),
    }


def run(
    count: int, rounds: int, kafka_kind: str, brokers: Sequence[str], batch_size: int = 1
) -> tuple[dict[str, Any], str]:
    rabbit = rabbitmq_reachable() if "amqp" in brokers else None
    scenarios = [s for s in SCENARIOS if s.broker in brokers and (s.broker != "amqp" or rabbit)]
    skipped = [s.label for s in SCENARIOS if s not in scenarios]
    results: dict[str, dict[str, list[dict[str, Any]]]] = {s.key: {"raw": [], "bridge": []} for s in scenarios}
    with kafka_broker(kafka_kind) as kafka, redis_server() as redis, \
            tempfile.TemporaryDirectory(prefix="crr-bench-bridge-") as workdir:
        topic = f"bench-bridge-{uuid.uuid4().hex[:8]}"
        kafka.create_topic(topic, 4)
        print(f"pre-filling {topic} with {count:,} ops on {kafka_kind} Kafka {kafka.bootstrap_servers}...", flush=True)
        messages, fill_s = prefill(kafka.bootstrap_servers, topic, count, Path(workdir))
        sizes = sorted(len(m) for m in messages)
        check_embedded_capacity(kafka_kind, count, statistics.mean(sizes))
        stack = Stack(kafka.bootstrap_servers, topic, redis.url, Path(workdir), messages, batch_size)
        for number in range(1, rounds + 1):
            for scenario in scenarios:
                # Alternate which side goes first, so slow phases of the machine hit both alike.
                order = ("raw", "bridge") if number % 2 else ("bridge", "raw")
                for side in order:
                    result = run_raw(stack, scenario) if side == "raw" else run_bridge(stack, scenario)
                    results[scenario.key][side].append(result)
                    print(f"round {number} {scenario.label:<22} {side:<7} {result['ops_s']:>9,.0f} ops/s "
                          f"({result['landed']:,} landed, {result['cpu_us_per_op']:.0f} us CPU/op)", flush=True)
    return _report(count, rounds, kafka_kind, scenarios=scenarios, skipped=skipped, results=results, sizes=sizes,
                   fill_s=fill_s, rabbit=rabbit, batch_size=batch_size)


def _batching(batch_size: int) -> str:
    return "one replay task per op" if batch_size == 1 else f"replay_batch tasks of up to {batch_size} ops"


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda r: r["ops_s"])
    return ordered[(len(ordered) - 1) // 2]


def _report(
    count: int, rounds: int, kafka_kind: str, *, scenarios: list[Scenario], skipped: list[str],
    results: dict[str, dict[str, list[dict[str, Any]]]], sizes: list[int], fill_s: float, rabbit: str | None,
    batch_size: int,
) -> tuple[dict[str, Any], str]:
    info = machine()
    rows, summary, lost = [], [], []
    for scenario in scenarios:
        bridge, raw = _median(results[scenario.key]["bridge"]), _median(results[scenario.key]["raw"])
        ratio = bridge["ops_s"] / raw["ops_s"]
        # The goal is about one task per op: a batched bridge decodes and validates every op,
        # while raw send_task only re-sends tasks built in advance.
        met = ratio >= GOAL_RATIO if batch_size == 1 else None
        for side, r in (("bridge", bridge), ("raw", raw)):
            if r["landed"] != count:
                lost.append(f"{scenario.label} {side}: {r['landed']:,} of {count:,} landed")
        rows.append([
            scenario.label, round(bridge["ops_s"]), round(bridge["steady_10_90_ops_s"]), round(raw["ops_s"]),
            round(ratio, 2), {True: "met", False: "MISSED", None: "-"}[met], round(bridge["cpu_us_per_op"]),
            round(raw["cpu_us_per_op"]),
            round(bridge["launch_to_first_s"], 1),
        ])
        summary.append({
            "what": f"bridge dispatch to Celery on {scenario.label}, {_batching(batch_size)}", "unit": "ops/s",
            "project": bridge["ops_s"], "raw": raw["ops_s"], "raw_what": "send_task of the same tasks", "ratio": ratio,
            "goal": f">= {GOAL_RATIO}x raw" if met is not None else None, "met": met,
        })
    headers = ["Celery broker", "bridge ops/s", "bridge steady 10-90% ops/s", "raw send_task ops/s",
               "bridge / raw", f"goal >= {GOAL_RATIO}x", "bridge CPU us/op", "raw CPU us/op",
               "bridge start to first task s"]
    per_round = markdown_table(
        ["round", *(f"{s.label} {side}" for s in scenarios for side in ("bridge", "raw"))],
        [[i + 1, *(round(results[s.key][side][i]["ops_s"]) for s in scenarios for side in ("bridge", "raw"))]
         for i in range(rounds)],
    )
    lines = [
        f"# {NAME}: bridge dispatch (Kafka -> Celery queue) vs raw send_task",
        "",
        f"{count:,} ops pre-filled in one topic (4 partitions, messages {sizes[0]}-{sizes[-1]} bytes) on "
        f"{kafka_description(kafka_kind)}; {rounds} round(s), median shown. No worker runs: tasks are counted "
        f"as they land in the Celery queue. The bridge is `celery -A bench_app redis-retry bridge` with "
        f"`redis_retry_batch_size={batch_size}` ({_batching(batch_size)}); raw is `app.send_task(...)` of the "
        "same tasks with the same arguments (`queue=`, `link_error=`) from one process.",
        "",
        markdown_table(headers, rows),
        "",
        "- bridge ops/s: tasks landed between the first and the last landing, polled every 5 ms; raw ops/s: "
        "from the first send_task call until all were in the queue",
        "- CPU us/op: CPU time of the bridge process (user + system, from /proc) or of the sending process, "
        "per op; on this 2-core machine the broker, Kafka and the benchmark share the other core",
        "- RabbitMQ with confirms: each publish waits for the broker's ack (the bridge forces "
        "`confirm_publish=True` on amqp); without confirms is for reference only",
        f"- pre-filling the topic with RetryProducer.publish took {fill_s:.1f} s",
    ]
    if skipped:
        lines.append(f"- skipped (RabbitMQ not reachable at {RABBITMQ_URL}): {', '.join(skipped)}")
    if lost:
        lines.insert(2, f"**WARNING: task counts differ from the ops published: {'; '.join(lost)}**\n")
    lines += ["", "Per round (ops/s):", "", per_round, "", f"Machine: {describe_machine(info)}", "",
              f"Code measured: {describe_code(code_under_test())}"]
    payload = {
        "ops": count, "rounds": rounds, "kafka": kafka_kind, "kafka_description": kafka_description(kafka_kind),
        "celery_brokers": [s.label for s in scenarios], "skipped": skipped,
        "message_bytes": {"min": sizes[0], "median": sizes[len(sizes) // 2], "max": sizes[-1]},
        "prefill_s": fill_s, "batch_size": batch_size, "results": results, "summary": summary,
        "goal_ratio": GOAL_RATIO,
        "servers": {**server_versions(), "rabbitmq": rabbit}, "code": code_under_test(), "machine": info,
    }
    return payload, "\n".join(lines)


def stage_costs(messages: list[str], redis_url: str, workdir: Path, repeats: int = 3) -> list[list[Any]]:
    """Mean us per op of the pieces of one hand-over, each timed in this process (best of ``repeats``).

    ``memory://`` is kombu's in-process transport: what Celery and kombu cost without any I/O.
    """
    import redis

    from celery_redis_retry.message import decode

    settings = Settings.from_mapping(
        {"redis_retry_kafka": {"bootstrap.servers": "127.0.0.1:1"},
         "redis_retry_targets": {"default": "redis://127.0.0.1:1/0"},
         "redis_retry_spool_path": str(workdir / "stages.sqlite3")}
    )
    raws = [m.encode() for m in messages]

    def app_for(broker_url: str) -> Any:
        env = bench_env(broker_url=broker_url, bootstrap="127.0.0.1:1", target_url="redis://127.0.0.1:1/0",
                        topic="t", group="g", queue="bench-stages", spool=str(workdir / "s.sqlite3"))
        return bench_app(env, name=f"stages-{uuid.uuid4().hex[:6]}")

    memory_app, redis_app = app_for("memory://"), app_for(redis_url)
    client = redis.Redis.from_url(redis_url)

    def validate() -> None:
        for raw in raws:
            settings.check_op(decode(raw, max_bytes=settings.max_message_bytes))

    def sender(
        app: Any, *, argsrepr: bool = False, reuse_producer: bool = False, batch: int = 0, no_declare: bool = False
    ) -> Any:
        errback = app.signature(DEAD_LETTER_TASK)
        extra: dict[str, Any] = {"argsrepr": "(op)", "kwargsrepr": "{}"} if argsrepr else {}
        if no_declare:  # the queue was declared once up front (reset() does it)
            extra["declare"] = []

        def send() -> None:
            with app.producer_or_acquire() as producer:
                batching = producer.batch(batch) if batch else contextlib.nullcontext()
                with batching:
                    for i, text in enumerate(messages):
                        app.send_task(REPLAY_TASK, args=(text,), kwargs={"origin": {"topic": "t", "partition": 0,
                                      "offset": i}}, queue="bench-stages", link_error=errback,
                                      producer=producer if reuse_producer or batch else None, **extra)
        return send

    body = b"x" * 1500  # about a replay task message on the Redis broker

    def lpush_each() -> None:
        for _ in messages:
            client.lpush("bench-stages-raw", body)

    def lpush_pipelined() -> None:
        for start in range(0, len(messages), 500):
            pipe = client.pipeline(transaction=False)
            for _ in messages[start:start + 500]:
                pipe.lpush("bench-stages-raw", body)
            pipe.execute()

    def reset() -> None:
        client.delete("bench-stages", "bench-stages-raw")
        for app in (memory_app, redis_app):
            with app.connection_for_write() as connection:
                app.amqp.queues["bench-stages"](connection.default_channel).declare()
        with memory_app.connection_for_write() as connection:
            connection.default_channel.queue_purge("bench-stages")

    stages = [
        ("decode + check_op (the bridge's validation)", validate),
        ("send_task, memory:// broker (Celery + kombu, no I/O)", sender(memory_app)),
        ("send_task, memory://, argsrepr/kwargsrepr given", sender(memory_app, argsrepr=True)),
        ("send_task, memory://, argsrepr + one producer reused", sender(memory_app, argsrepr=True,
                                                                       reuse_producer=True)),
        ("send_task, memory://, argsrepr + producer reused + declare=[]", sender(memory_app, argsrepr=True,
                                                                                reuse_producer=True,
                                                                                no_declare=True)),
        ("send_task, Redis broker (as the bridge does)", sender(redis_app)),
        ("send_task, Redis broker, argsrepr + one producer reused", sender(redis_app, argsrepr=True,
                                                                          reuse_producer=True)),
        ("send_task, Redis broker, argsrepr + kombu Producer.batch(500)", sender(redis_app, argsrepr=True,
                                                                                batch=500)),
        ("send_task, Redis broker, argsrepr + declare=[] + Producer.batch(500)",
         sender(redis_app, argsrepr=True, batch=500, no_declare=True)),
        ("redis-py LPUSH of a 1.5 kB body, one per round trip", lpush_each),
        ("redis-py LPUSH of a 1.5 kB body, pipelined by 500", lpush_pipelined),
    ]
    best = dict.fromkeys((name for name, _ in stages), float("inf"))
    for _ in range(repeats):
        for name, stage in stages:
            reset()
            start = time.perf_counter()
            stage()
            best[name] = min(best[name], time.perf_counter() - start)
    reset()
    client.close()
    return [[name, round(seconds * 1e6 / len(messages), 1), round(len(messages) / seconds)]
            for name, seconds in best.items()]


def profile(count: int, kafka_kind: str, broker: str, batch_size: int = 1) -> int:
    """The bridge under py-spy for one run; prints and saves its top functions."""
    scenario = next(s for s in SCENARIOS if s.broker == broker)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    suffix = "" if batch_size == 1 else f"-batch{batch_size}"
    raw_path = RESULTS_DIR / f"{NAME}.profile-{scenario.key}{suffix}.txt"
    with kafka_broker(kafka_kind) as kafka, redis_server() as redis, \
            tempfile.TemporaryDirectory(prefix="crr-bench-bridge-") as workdir:
        topic = f"bench-bridge-{uuid.uuid4().hex[:8]}"
        kafka.create_topic(topic, 4)
        messages, _ = prefill(kafka.bootstrap_servers, topic, count, Path(workdir))
        stack = Stack(kafka.bootstrap_servers, topic, redis.url, Path(workdir), messages, batch_size)
        result = run_bridge(stack, scenario, profile_to=raw_path)
        print("timing the pieces of a hand-over in this process...", flush=True)
        stages = stage_costs(messages[:2000], redis.url, Path(workdir))
    top = summarize_collapsed(raw_path, top=30, within="Bridge.run")
    print(f"bridge under py-spy ({scenario.label}): {result['ops_s']:,.0f} ops/s (slowed by sampling), "
          f"{top['samples']:,} samples, wall clock including idle waits\n")
    print(markdown_table(["self (leaf) frame", "% of samples"], top["self"]))
    print()
    print(markdown_table(["inclusive frame", "% of samples"], top["inclusive"]))
    print()
    print(markdown_table(["stage (in this process)", "us/op", "ops/s"], stages))
    summary_path = raw_path.with_suffix(".json")
    summary_path.write_text(
        json.dumps({"scenario": scenario.label, "batch_size": batch_size, "run": result, **top,
                    "stages_us_per_op": stages, "code": code_under_test()}, indent=2)
    )
    print(f"\ncollapsed stacks: {raw_path} (speedscope.app or flamegraph.pl read them); summary {summary_path}")
    return 0


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_bridge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", type=int, default=20_000, help="ops in the topic (default 20,000)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each side per broker (default 1)")
    parser.add_argument("--kafka", choices=("embedded", "tansu"), default="embedded",
                        help="Kafka broker (default embedded; it keeps ~5 MiB per partition)")
    parser.add_argument("--brokers", default="redis,amqp", help="Celery brokers: redis, amqp (default both)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="redis_retry_batch_size (default 1: one replay task per op; >1: replay_batch tasks)")
    parser.add_argument("--json", metavar="PATH", help=f"results file (default {RESULTS_DIR}/{NAME}.json; .md beside)")
    parser.add_argument("--profile", action="store_true",
                        help="run the bridge once under py-spy (first broker of --brokers) and print its hot spots")
    args = parser.parse_args(list(argv))
    brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    wrong_brokers = not brokers or not set(brokers) <= {"redis", "amqp"}
    if args.ops < WARMUP or args.rounds < 1 or args.batch_size < 1 or wrong_brokers:
        parser.error(f"--ops >= {WARMUP}, --rounds >= 1, --batch-size >= 1, --brokers among redis,amqp")
    check_embedded_capacity(args.kafka, args.ops, 420)
    if args.profile:
        return profile(args.ops, args.kafka, brokers[0], args.batch_size)
    payload, markdown = run(args.ops, args.rounds, args.kafka, brokers, args.batch_size)
    publish_results(NAME, payload, markdown, args.json, args.batch_size)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
