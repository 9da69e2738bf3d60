"""Benchmark: draining a backlog end to end (Kafka -> bridge -> Celery -> Redis) against raw redis-py.

``--ops`` SET ops (the ``bench_publish`` ones, ~390-byte messages) are published to a topic
first. Then one bridge (``celery -A bench_app redis-retry bridge``) and one worker
(``celery -A bench_app worker -P prefork -c 2``, Redis as the Celery broker) start together
and the benchmark polls the target Redis until every op is applied, sampling every second:
the applied count, the Celery queue's length, and VmRSS / CPU of the bridge, the worker's
main process and one pool child (from ``/proc/<pid>/status``). At the end every key is
counted. The raw row writes the very same SET commands with redis-py pipelines of 1,000
from one process into the same (flushed) target.

Kafka: Tansu by default. The embedded broker keeps only ~5 MiB per partition and silently
drops older data, so it is refused for backlogs that do not fit (``--kafka embedded`` is fine
for quick checks of a few thousand ops).

``--batch-size N`` sets ``redis_retry_batch_size`` in the app (env ``CRR_BENCH_BATCH_SIZE``)
for batched replay; 1 (the default) is one Celery task per op. Until batched replay exists
the bridge ignores it; the results record which value was used.

``--commit-after end,handover`` (the default: both, in the same run) drains the same backlog
with ``redis_retry_commit_after`` set to each: Kafka holding every op until a worker reports
its end (the package default), and committing once Celery accepted the task.

Goals: bridge RSS flat within 10% over the drain; every op applied; committing after end
costs at most 10% of the throughput of committing at hand-over.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from celery_redis_retry.testing import CeleryCommand

from .bench_bridge import prefill
from .machine import code_under_test, describe_code, describe_machine, machine, server_versions
from .output import RESULTS_DIR, markdown_table, publish_results
from .processes import ProcessSampler, children
from .stack import (
    bench_env,
    celery_worker,
    check_embedded_capacity,
    kafka_broker,
    kafka_description,
    keys_applied,
    redis_server,
)
from .timing import rate

NAME = "bench_drain"
RAW_PIPELINE = 1000
RSS_GOAL_PCT = 10.0
#: Committing after end may cost at most this share of the throughput of committing at hand-over.
COMMIT_COST_GOAL = 0.10
POLL_INTERVAL = 0.1
PATTERN = "user:*:profile"


def count_keys(client: redis.Redis, pattern: str = PATTERN) -> int:
    """Keys matching ``pattern`` (SCAN, not KEYS: the target stays responsive)."""
    return sum(1 for _ in client.scan_iter(match=pattern, count=10_000))


def raw_pipelined(target_url: str, commands: list[tuple[Any, ...]]) -> dict[str, Any]:
    """The same commands with redis-py pipelines of :data:`RAW_PIPELINE`, from this process."""
    client = redis.Redis.from_url(target_url)
    client.flushdb()
    start = time.perf_counter()
    for first in range(0, len(commands), RAW_PIPELINE):
        pipe = client.pipeline(transaction=False)
        for command in commands[first:first + RAW_PIPELINE]:
            pipe.execute_command(*command)
        pipe.execute()
    seconds = time.perf_counter() - start
    applied = count_keys(client)
    client.flushdb()
    client.close()
    return {"ops": len(commands), "applied": applied, "seconds": seconds, "ops_s": rate(len(commands), seconds)}


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


def drain(
    *, bootstrap: str, topic: str, broker_url: str, target_url: str, workdir: Path, total: int,
    batch_size: int | None, batch_linger_ms: int | None, concurrency: int, loglevel: str, timeout: float,
    kafka_settings: dict[str, Any], commit_after: str = "end",
) -> dict[str, Any]:
    """Start a worker and a bridge over the filled topic; wait until all ops are applied."""
    name = uuid.uuid4().hex[:8]
    queue = f"bench-drain-{name}"
    env = bench_env(broker_url=broker_url, bootstrap=bootstrap, target_url=target_url, topic=topic,
                    group=f"bench-drain-{name}", queue=queue, spool=str(workdir / "spool.sqlite3"),
                    batch_size=batch_size, batch_linger_ms=batch_linger_ms)
    env["CRR_BENCH_COMMIT_AFTER"] = commit_after
    if kafka_settings:
        env["CRR_BENCH_KAFKA_EXTRA"] = json.dumps({**json.loads(env["CRR_BENCH_KAFKA_EXTRA"]), **kafka_settings})
    target = redis.Redis.from_url(target_url)
    broker = redis.Redis.from_url(broker_url)
    target.flushdb()
    worker = celery_worker(env, queue, workdir, concurrency=concurrency, loglevel=loglevel)
    bridge = CeleryCommand("bench_app", ["redis-retry", "bridge"], env=env, cwd=str(workdir), log_dir=workdir)
    sampler = ProcessSampler({"bridge": lambda: bridge.pid, "worker main": lambda: worker.pid,
                              "worker child": _Child(worker)})
    progress: list[dict[str, Any]] = []
    try:
        launched = time.perf_counter()
        worker.start()
        bridge.start(ready_pattern=r"bridge consuming", timeout=120)
        sampler.start()
        first: tuple[float, int] | None = None
        next_progress = 0.0
        deadline = time.monotonic() + timeout
        while True:
            applied = keys_applied(target, total, PATTERN)
            now = time.perf_counter()
            if applied and first is None:
                first = (now, applied)
                sampler.mark_warm()
            if now >= next_progress or applied >= total:
                progress.append({"t": round(now - launched, 2), "applied": applied,
                                 "celery_queue": int(broker.llen(queue))})
                next_progress = now + 1.0
            if applied >= total:
                break
            for process in (bridge, worker):
                if not process.running:
                    raise SystemExit(f"{process.name} exited ({process.returncode}):\n{process.log_tail()}")
            if time.monotonic() > deadline:
                print(f"timed out after {timeout:g} s with {applied:,} of {total:,} applied", flush=True)
                break
            time.sleep(POLL_INTERVAL)
        done = time.perf_counter()
        sampler.sample_now()
    finally:
        rss = sampler.stop() if sampler._thread.is_alive() else {}
        for process in (bridge, worker):
            if process.running:
                process.stop(timeout=30)
    applied = count_keys(target)
    errors = sum(p.log_text().count("ERROR") for p in (bridge, worker))
    target.close()
    broker.delete(queue)
    broker.close()
    first_t, first_c = first if first else (done, 0)
    for part in rss.values():
        part["late_growth_pct"] = _late_growth(part.get("samples", []))
    return {
        "batch_size": batch_size, "commit_after": commit_after, "ops": total, "applied": applied,
        "all_applied": applied == total,
        "launch_to_done_s": done - launched,
        "launch_to_first_s": first_t - launched, "first_to_last_s": done - first_t,
        "ops_s": rate(total, done - launched), "ops_s_first_to_last": rate(applied - first_c, done - first_t),
        "celery_queue_peak": max((p["celery_queue"] for p in progress), default=0), "error_log_lines": errors,
        "rss": rss, "progress": progress, "bridge_log": str(bridge.log_path), "worker_log": str(worker.log_path),
    }


def _late_growth(samples: list[dict[str, Any]]) -> float | None:
    """RSS growth in the second half of the drain over the first half's peak, in %.

    The first seconds fill librdkafka's fetch queue and Python's allocator; growth that
    goes on after them is what an unbounded buffer would look like.
    """
    if len(samples) < 4:
        return None
    half = len(samples) // 2
    early, late = max(s["rss_kib"] for s in samples[:half]), max(s["rss_kib"] for s in samples[half:])
    return round(100 * (late - early) / early, 1)


def batch_sizes(text: str) -> list[int | None]:
    """``"1,100,default"`` -> ``[1, 100, None]`` (None: the package's default)."""
    out: list[int | None] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        out.append(None if part == "default" else int(part))
    if not out or any(v is not None and v < 1 for v in out):
        raise ValueError(text)
    return out


def run(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    sizes_to_run = batch_sizes(args.batch_size)
    with kafka_broker(args.kafka) as kafka, redis_server() as celery_broker, redis_server() as target, \
            tempfile.TemporaryDirectory(prefix="crr-bench-drain-") as workdir:
        topic = f"bench-drain-{uuid.uuid4().hex[:8]}"
        for name in (topic, f"{topic}.ends"):  # before the bridge subscribes: Tansu would not see it for minutes
            kafka.create_topic(name, 4)
        print(f"publishing {args.ops:,} ops to {topic} on {args.kafka} Kafka {kafka.bootstrap_servers}...", flush=True)
        messages, fill_s = prefill(kafka.bootstrap_servers, topic, args.ops, Path(workdir))
        sizes = sorted(len(m) for m in messages)
        check_embedded_capacity(args.kafka, args.ops, statistics.mean(sizes))
        drains = []
        # Every drain reads the same topic from the start with a new consumer group.
        # Repeats alternate the modes, so that a slow spell of the machine hits both alike.
        for batch_size in sizes_to_run:
            for commit_after in args.commit_after * args.repeat:
                print(f"draining with one bridge and one worker (-c {args.concurrency}, redis_retry_batch_size="
                      f"{batch_size or 'default'}, commit after {commit_after})...", flush=True)
                result = drain(bootstrap=kafka.bootstrap_servers, topic=topic, broker_url=celery_broker.url,
                               target_url=target.url, workdir=Path(workdir), total=args.ops, batch_size=batch_size,
                               batch_linger_ms=args.batch_linger_ms, concurrency=args.concurrency,
                               loglevel=args.loglevel, timeout=args.timeout, kafka_settings=args.kafka_extra,
                               commit_after=commit_after)
                print(f"drained {result['applied']:,} of {args.ops:,} in {result['launch_to_done_s']:.1f} s "
                      f"({result['ops_s']:,.0f} ops/s)", flush=True)
                drains.append(result)
        commands = [tuple(json.loads(m)["cmds"][0]) for m in messages]
        raw = raw_pipelined(target.url, commands)
        print(f"raw pipelined SET: {raw['ops_s']:,.0f} ops/s", flush=True)
    return _report(args, drains, raw, sizes, fill_s)


def _label(batch_size: int | None, commit_after: str | None = None) -> str:
    if batch_size is None:
        size = "package default batch size"
    else:
        size = "one task per op" if batch_size == 1 else f"batches of up to {batch_size}"
    if commit_after is None:
        return size
    return f"{size}, commit {'after end' if commit_after == 'end' else 'at hand-over'}"


def _commit_cost(drains: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per batch size: throughput committing after end over committing at hand-over (medians of the repeats)."""
    rows = []
    for batch_size in dict.fromkeys(d["batch_size"] for d in drains):
        rates = {mode: [d["ops_s"] for d in drains if d["batch_size"] == batch_size and d.get("commit_after") == mode]
                 for mode in ("end", "handover")}
        if not rates["end"] or not rates["handover"]:
            continue
        end, handover = statistics.median(rates["end"]), statistics.median(rates["handover"])
        ratio = end / handover
        pairs = [round(e / h, 3) for e, h in zip(rates["end"], rates["handover"], strict=False)]
        rows.append({"what": f"drain throughput committing after end vs at hand-over, {_label(batch_size)}"
                             + (f" (median of {len(pairs)} alternating runs; each run's ratio: "
                                f"{', '.join(f'{p:.3f}' for p in pairs)})" if len(pairs) > 1 else ""),
                     "unit": "ops/s", "project": end, "raw": handover,
                     "raw_what": "the same drain committing at hand-over", "ratio": ratio,
                     "goal": f">= {1 - COMMIT_COST_GOAL:g}x", "met": ratio >= 1 - COMMIT_COST_GOAL})
    return rows


def _report(
    args: argparse.Namespace, drains: list[dict[str, Any]], raw: dict[str, Any], sizes: list[int], fill_s: float,
) -> tuple[dict[str, Any], str]:
    info = machine()
    rows, rss_rows, summary, notes = [], [], [], []
    for result in drains:
        label = _label(result["batch_size"], result.get("commit_after"))
        ratio = result["ops_s"] / raw["ops_s"]
        bridge = result["rss"].get("bridge", {})
        growth = bridge.get("warm_growth_pct")
        rss_met = growth is not None and growth <= RSS_GOAL_PCT
        rows.append([f"drain, {label}", result["ops"], result["applied"], round(result["launch_to_done_s"], 1),
                     round(result["ops_s"]), round(result["ops_s_first_to_last"]), f"{ratio:.4f}",
                     f"{result['celery_queue_peak']:,}"])
        for process, r in result["rss"].items():
            rss_rows.append([label, process, r.get("start_mib", "-"), _dash(r.get("warm_mib")), r.get("peak_mib", "-"),
                             r.get("end_mib", "-"), _dash(r.get("growth_pct")), _dash(r.get("warm_growth_pct")),
                             _dash(r.get("late_growth_pct")), len(r.get("samples", []))])
        summary += [
            {"what": f"drain {args.ops:,} ops end to end, {label}", "unit": "ops/s", "project": result["ops_s"],
             "raw": raw["ops_s"], "raw_what": f"redis-py pipelines of {RAW_PIPELINE}", "ratio": ratio,
             "goal": "all applied", "met": result["all_applied"]},
            {"what": f"bridge RSS growth during the drain, {label}", "unit": "%", "project": growth, "raw": None,
             "raw_what": None, "ratio": None, "goal": f"<= {RSS_GOAL_PCT:g}% after the first op applied",
             "met": rss_met},
        ]
        notes.append(
            f"- {label}: every op applied **{'yes' if result['all_applied'] else 'NO'}** ({result['applied']:,} "
            f"keys counted at the end), {result['error_log_lines']} ERROR lines in the logs; launch to first "
            f"applied {result['launch_to_first_s']:.1f} s; bridge RSS goal (flat within {RSS_GOAL_PCT:g}% once "
            f"draining) **{'met' if rss_met else 'MISSED'}** ({_dash(growth)}% over its RSS when the first op was "
            f"applied; {_dash(bridge.get('growth_pct'))}% over its RSS at launch; "
            f"{_dash(bridge.get('late_growth_pct'))}% in the second half of the drain)"
        )
    cost = _commit_cost(drains)
    summary += cost
    notes += [f"- {c['what']}: {c['ratio']:.3f}x ({c['project']:,.0f} vs {c['raw']:,.0f} ops/s; goal "
              f"{c['goal']}: **{'met' if c['met'] else 'MISSED'}**)" for c in cost]
    rows.append([f"raw redis-py pipelined SET (batches of {RAW_PIPELINE:,})", raw["ops"], raw["applied"],
                 round(raw["seconds"], 2), round(raw["ops_s"]), round(raw["ops_s"]), "1", "-"])
    kafka_note = f"; consumer settings added: `{json.dumps(args.kafka_extra)}`" if args.kafka_extra else ""
    lines = [
        f"# {NAME}: draining a {args.ops:,}-op backlog end to end vs raw redis-py pipelines",
        "",
        f"{args.ops:,} SET ops (messages {sizes[0]}-{sizes[-1]} bytes) published to one topic (4 partitions) on "
        f"{kafka_description(args.kafka)}{kafka_note}, then drained by one bridge and one `celery worker -P prefork "
        f"-c {args.concurrency} -l {args.loglevel}` (Redis Celery broker), once per batch size (a new consumer "
        "group each time, the target flushed before each).",
        "",
        markdown_table(["row", "ops", "applied", "seconds", "ops/s (from launch)", "ops/s (first to last applied)",
                        "/ raw", "Celery queue peak"], rows),
        "",
        *notes,
        "- Celery queue peak: tasks waiting in the Celery broker at once; the bridge runs ahead of the worker and "
        "the backlog moves from Kafka into the Celery broker's memory",
        f"- publishing the backlog with RetryProducer took {fill_s:.1f} s",
        "",
        "Memory (VmRSS, MiB, sampled every second during each drain. start: at launch; warm: when the first op "
        "was applied; growth: peak over start, warm growth: peak after warm over warm, late growth: second "
        "half's peak over the first half's):",
        "",
        markdown_table(["drain", "process", "start", "warm", "peak", "end", "growth %", "warm growth %",
                        "late growth %", "samples"], rss_rows),
        "",
        "The bridge's RSS between launch and the first applied op includes librdkafka's prefetch "
        "(`queued.max.messages.kbytes`, 64 MiB by default, and fetch responses up to `fetch.max.bytes`) "
        "filling with the backlog; `--kafka-extra` can set smaller ones to compare.",
        "",
    ]
    for result in drains:
        lines += [f"Progress, {_label(result['batch_size'], result.get('commit_after'))}:", "",
                  markdown_table(["t s", "applied", "Celery queue"],
                                 [[p["t"], p["applied"], p["celery_queue"]] for p in _thin(result["progress"], 10)]),
                  ""]
    lines += [f"Machine: {describe_machine(info)}", "", f"Code measured: {describe_code(code_under_test())}"]
    missing = [r for r in drains if not r["all_applied"]]
    if missing:
        shortfalls = [f"{_label(r['batch_size'], r.get('commit_after'))} {r['applied']:,} of {args.ops:,}"
                      for r in missing]
        lines.insert(2, "**WARNING: not every op was applied: " + "; ".join(shortfalls) + ".**\n")
    payload = {
        "ops": args.ops, "kafka": args.kafka, "kafka_description": kafka_description(args.kafka),
        "kafka_extra": args.kafka_extra, "batch_sizes": [r["batch_size"] for r in drains],
        "commit_after": args.commit_after, "repeat": args.repeat,
        "batch_linger_ms": args.batch_linger_ms, "concurrency": args.concurrency, "loglevel": args.loglevel,
        "celery_broker": "redis",
        "message_bytes": {"min": sizes[0], "median": sizes[len(sizes) // 2], "max": sizes[-1]},
        "publish_s": fill_s, "drains": drains, "raw": raw, "summary": summary, "servers": server_versions(),
        "code": code_under_test(), "machine": info,
    }
    return payload, "\n".join(lines)


def _dash(value: Any) -> Any:
    return "-" if value is None else value


def _thin(items: list[dict[str, Any]], most: int) -> list[dict[str, Any]]:
    """At most ``most`` evenly spread items, the last one included."""
    if len(items) <= most:
        return items
    step = (len(items) - 1) / (most - 1)
    return [items[round(i * step)] for i in range(most)]


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_drain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", type=int, default=100_000, help="backlog size (default 100,000)")
    parser.add_argument("--kafka", choices=("tansu", "embedded"), default="tansu",
                        help="Kafka broker (default tansu; embedded keeps only ~5 MiB per partition)")
    parser.add_argument("--batch-size", default="default",
                        help="redis_retry_batch_size, or several to compare: '1,100,default' (default: the "
                             "package's default; 1 is one task per op)")
    parser.add_argument("--kafka-extra", type=json.loads, default={},
                        help="JSON of librdkafka settings added for the bridge, e.g. "
                             "'{\"queued.max.messages.kbytes\": 8192}'")
    parser.add_argument("--batch-linger-ms", type=int, default=None, help="redis_retry_batch_linger_ms")
    parser.add_argument("--commit-after", type=lambda text: text.split(","), default=["end", "handover"],
                        help="redis_retry_commit_after values to drain with, comma-separated (default end,handover)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="drain each --commit-after mode this many times, alternating (default 1); the "
                             "throughput ratio is taken between the modes' medians")
    parser.add_argument("--concurrency", type=int, default=2, help="worker -c (default 2)")
    parser.add_argument("--loglevel", default="INFO", help="worker -l (default INFO)")
    parser.add_argument("--timeout", type=float, default=1800, help="give up draining after seconds (default 1800)")
    parser.add_argument("--json", metavar="PATH", help=f"results file (default {RESULTS_DIR}/{NAME}.json; .md beside)")
    args = parser.parse_args(list(argv))
    try:
        batch_sizes(args.batch_size)
    except ValueError:
        parser.error(f"--batch-size: integers >= 1 or 'default', comma-separated, not {args.batch_size!r}")
    if args.ops < 100 or args.concurrency < 1 or args.repeat < 1:
        parser.error("--ops >= 100, --concurrency >= 1, --repeat >= 1")
    if not set(args.commit_after) <= {"end", "handover"}:
        parser.error(f"--commit-after: 'end' and/or 'handover', comma-separated, not {','.join(args.commit_after)!r}")
    check_embedded_capacity(args.kafka, args.ops, 420)
    payload, markdown = run(args)
    publish_results(NAME, payload, markdown, args.json)
    return 0 if all(d["all_applied"] for d in payload["drains"]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
