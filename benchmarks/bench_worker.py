"""Benchmark: the worker's replay rate against a raw Celery task doing the same redis-py command.

For each workload, ``--ops`` tasks are queued in the Celery broker (a Redis the benchmark
starts) before any worker runs; then a real ``celery -A bench_app worker -c 2 -P prefork``
starts and the benchmark polls the target Redis (``INFO commandstats``: how many times it
ran the workload's command, inside Lua steps too; every 10 ms) until every op
is applied. The rate is timed from the first applied op to the last, so worker start-up
is left out. Rows:

* ``replay``: ``celery_redis_retry.replay`` tasks, exactly as the bridge sends them (the
  message text, the origin, ``link_error=dead_letter``);
* ``raw task``: ``bench.raw_command`` (``benchmarks/apps/bench_app.py``), a plain Celery task
  with the same options (late ack, no result) that runs the same command with redis-py's
  ``execute_command`` on a per-process client.

Workloads: ``set`` (a SET with PXAT of a ~140-byte value, the ``bench_publish`` ops: an
idempotent command), ``incrby`` (INCRBY, not idempotent: replay applies it under a dedupe
marker; the raw task runs a bare INCRBY) and ``rpush`` (RPUSH of one item to a list of its
own, not idempotent either).
Same worker settings for both rows: prefork, ``-c 2``, prefetch multiplier 4, ``-l INFO``
(Celery logs two lines per task at INFO; ``--loglevel WARNING`` shows what that costs).

``--profile`` runs the ``set`` replay row under py-spy (CPU, all worker processes) instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from celery_redis_retry import message, ops
from celery_redis_retry.names import DEAD_LETTER_TASK, REPLAY_BATCH_TASK, REPLAY_TASK

from .apps.bench_app import RAW_COMMAND_TASK, RAW_PIPELINE_TASK
from .bench_publish import build_ops
from .machine import code_under_test, describe_code, describe_machine, machine, server_versions
from .output import RESULTS_DIR, markdown_table, publish_results
from .processes import children, proc_status
from .profiling import PySpy, summarize_collapsed
from .queues import prequeue
from .stack import bench_app, bench_env, celery_worker, redis_server
from .timing import rate

NAME = "bench_worker"
POLL_INTERVAL = 0.01
STALL_TIMEOUT = 60.0
INCRBY_AMOUNT = 7
#: Batched replays of non-idempotent ops (dedupe markers, stamps) against a raw pipeline.
BATCHED_GOAL = 0.6


@dataclass(frozen=True)
class Workload:
    """One kind of op: the replay messages, the raw commands, and how to check the outcome."""

    kind: str
    messages: list[str]
    commands: list[tuple[Any, ...]]
    #: Matches the data keys only: not the dedupe markers and write stamps a replay adds beside them.
    pattern: str
    #: Data keys in the target once every op ran, replayed or raw.
    keys: int

    @classmethod
    def build(cls, kind: str, count: int) -> Workload:
        if kind == "set":
            items = build_ops(count)
            return cls(kind, [message.encode(op).decode() for op in items], [op.commands[0] for op in items],
                       "user:*:profile", count)
        if kind == "rpush":
            items = [ops.rpush(f"list:{n}", f"item-{n}") for n in range(count)]
            return cls(kind, [message.encode(op).decode() for op in items], [op.commands[0] for op in items],
                       "list:*", count)
        items = [ops.incrby(f"counter:{n}", INCRBY_AMOUNT) for n in range(count)]
        return cls(kind, [message.encode(op).decode() for op in items], [op.commands[0] for op in items],
                   "counter:*", count)


def _verify(client: redis.Redis, workload: Workload) -> dict[str, Any]:
    """Count the keys the ops wrote (and their values, for INCRBY)."""
    keys = list(client.scan_iter(match=workload.pattern, count=5000))
    out: dict[str, Any] = {"keys": len(keys)}
    if workload.kind == "incrby":
        wrong = 0
        for start in range(0, len(keys), 5000):
            wrong += sum(1 for v in client.mget(keys[start:start + 5000]) if int(v or 0) != INCRBY_AMOUNT)
        out["wrong_values"] = wrong
    if workload.kind == "rpush":
        # One item per list: a list of two means an op ran twice.
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.llen(key)
        out["wrong_values"] = sum(1 for length in pipe.execute() if length != 1)
    return out


def _queue_all(app: Any, queue: str, workload: Workload, side: str, batch_size: int) -> tuple[float, int]:
    """Queue the tasks for every op (as the bridge would); return the seconds it took and the keys expected."""
    messages, commands, size = workload.messages, workload.commands, batch_size
    if side == "replay":
        if size == 1:
            calls = [(REPLAY_TASK, (text,), {"origin": {"topic": "t", "partition": i % 4, "offset": i}})
                     for i, text in enumerate(messages)]
        else:
            calls = [(REPLAY_BATCH_TASK, (messages[first:first + size],
                                          [["t", i % 4, i] for i in range(first, min(first + size, len(messages)))]),
                      {}) for first in range(0, len(messages), size)]
        return prequeue(app, queue, calls, link_error=app.signature(DEAD_LETTER_TASK)), workload.keys
    if size == 1:
        calls = [(RAW_COMMAND_TASK, tuple(c), {}) for c in commands]
    else:
        calls = [(RAW_PIPELINE_TASK, ([list(c) for c in commands[first:first + size]],), {})
                 for first in range(0, len(commands), size)]
    return prequeue(app, queue, calls), workload.keys


def commands_run(client: redis.Redis, command: str) -> int:
    """How many times the target ran ``command`` since its stats were reset, inside Lua steps too.

    One INFO call, whatever the number of keys: counting keys instead (SCAN) would load the
    target more as the replays add their markers and write stamps beside the data keys.
    """
    entry = client.info("commandstats").get(f"cmdstat_{command.lower()}")
    return int(entry["calls"]) if entry else 0


def _wait_applied(
    worker: Any, target: redis.Redis, expected: int, command: str, profile_to: Path | None
) -> tuple[list[tuple[float, int]], dict[str, int] | None, dict[str, int]]:
    """Poll the target until it ran ``command`` ``expected`` times: the samples and the worker's CPU then."""
    samples: list[tuple[float, int]] = []
    cpu_first: dict[str, int] | None = None
    spy = None
    last, changed = -1, time.monotonic()
    try:
        while True:
            count = commands_run(target, command)
            samples.append((time.perf_counter(), count))
            if count and cpu_first is None:
                cpu_first = _worker_cpu_ms(worker.pid)
                if profile_to is not None:
                    spy = PySpy(worker.pid, profile_to, idle=False, subprocesses=True)
            if count >= expected:
                return samples, cpu_first, _worker_cpu_ms(worker.pid)
            if count != last:
                last, changed = count, time.monotonic()
            elif time.monotonic() - changed > STALL_TIMEOUT:
                raise SystemExit(f"{count} of {expected} keys after {STALL_TIMEOUT:g} s without progress; "
                                 f"worker log {worker.log_path}:\n{worker.log_tail()}")
            if not worker.running:
                raise SystemExit(f"the worker exited ({worker.returncode}):\n{worker.log_tail()}")
            time.sleep(POLL_INTERVAL)
    finally:
        if spy is not None:
            spy.stop()


def _wait_acked(broker: redis.Redis, queue: str, worker: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and worker.running:
        if broker.llen(queue) == 0 and broker.hlen("unacked") == 0:
            return
        time.sleep(0.05)


def run_one(
    redis_url: str, target_url: str, workdir: Path, workload: Workload, side: str, *, concurrency: int,
    loglevel: str, batch_size: int = 1, profile_to: Path | None = None,
) -> dict[str, Any]:
    """Queue every task, start a worker, time until all are applied; return the measurements."""
    queue = f"bench-worker-{uuid.uuid4().hex[:8]}"
    env = bench_env(broker_url=redis_url, bootstrap="127.0.0.1:1", target_url=target_url, topic="unused",
                    group="unused", queue=queue, spool=str(workdir / f"spool-{queue}.sqlite3"))
    app = bench_app(env, name=f"queue-{queue}")
    target = redis.Redis.from_url(target_url)
    target.flushdb()
    target.config_resetstat()
    total = len(workload.messages)
    queued_s, expected = _queue_all(app, queue, workload, side, batch_size)
    broker = redis.Redis.from_url(redis_url)
    tasks = -(-total // batch_size)
    if broker.llen(queue) != tasks:
        raise SystemExit(f"queued {broker.llen(queue)} tasks, not {tasks}")
    worker = celery_worker(env, queue, workdir, concurrency=concurrency, loglevel=loglevel)
    try:
        launched = time.perf_counter()
        worker.start()
        samples, cpu_first, cpu_last = _wait_applied(worker, target, expected, workload.commands[0][0], profile_to)
        # Stop only once every task is acknowledged: a warm shutdown restores unacknowledged
        # messages to the queue, and they would run again at the next start.
        _wait_acked(broker, queue, worker)
        worker.stop(timeout=30)
    finally:
        if worker.running:
            worker.kill()
    left_in_queue = int(broker.llen(queue))
    broker.delete(queue)
    broker.close()
    redis_us = _redis_busy_us(target)
    check = _verify(target, workload)
    target.close()
    first_t, first_c = next((t, c) for t, c in samples if c > 0)
    last_t = samples[-1][0]
    low = next((t, c) for t, c in samples if c >= expected * 0.1)
    high = next((t, c) for t, c in samples if c >= expected * 0.9)
    return {
        "ops": total, "tasks": tasks, "applied_keys": check["keys"], **check, "left_in_queue": left_in_queue,
        "seconds": last_t - first_t, "ops_s": rate(expected - first_c, last_t - first_t),
        "steady_10_90_ops_s": rate(high[1] - low[1], high[0] - low[0]),
        "launch_to_first_s": first_t - launched, "prequeue_s": queued_s, "redis_us_per_op": redis_us / total,
        "cpu_us_per_op": (cpu_last["total"] - cpu_first["total"]) * 1000 / total if cpu_first else None,
        "cpu_parent_us_per_op": (cpu_last["parent"] - cpu_first["parent"]) * 1000 / total if cpu_first else None,
        "log": str(worker.log_path),
    }


def _redis_busy_us(client: redis.Redis) -> float:
    """Microseconds the target spent running commands since its stats were reset (INFO commandstats).

    A Lua step's own commands count inside its EVALSHA's time, so the sum is not counted twice
    for them; the commands a script runs are also listed on their own lines, and are left out.
    """
    stats = client.info("commandstats")
    scripts = ("cmdstat_evalsha", "cmdstat_eval")
    if any(name in stats for name in scripts):
        return float(sum(stats[name]["usec"] for name in scripts if name in stats))
    return float(sum(entry["usec"] for name, entry in stats.items() if name != "cmdstat_config"))


def _worker_cpu_ms(pid: int | None) -> dict[str, int]:
    """CPU time of the worker's main process and of all its pool children, in ms."""
    if pid is None:
        return {"parent": 0, "total": 0}
    parent = (proc_status(pid) or {}).get("cpu_ms", 0)
    pool = sum((proc_status(child) or {}).get("cpu_ms", 0) for child in children(pid))
    return {"parent": parent, "total": parent + pool}


def run(
    count: int, rounds: int, kinds: Sequence[str], *, concurrency: int, loglevel: str, batch_size: int = 1
) -> tuple[dict[str, Any], str]:
    results: dict[str, dict[str, list[dict[str, Any]]]] = {k: {"replay": [], "raw": []} for k in kinds}
    workloads = {kind: Workload.build(kind, count) for kind in kinds}
    with redis_server() as celery_broker, redis_server() as target, \
            tempfile.TemporaryDirectory(prefix="crr-bench-worker-") as workdir:
        for number in range(1, rounds + 1):
            for kind in kinds:
                order = ("replay", "raw") if number % 2 else ("raw", "replay")
                for side in order:
                    result = run_one(celery_broker.url, target.url, Path(workdir), workloads[kind], side,
                                     concurrency=concurrency, loglevel=loglevel, batch_size=batch_size)
                    results[kind][side].append(result)
                    print(f"round {number} {kind:<7} {side:<7} {result['ops_s']:>8,.0f} ops/s "
                          f"({result['applied_keys']:,} keys, {result['cpu_us_per_op']:.0f} us CPU/op)", flush=True)
    return _report(count, rounds, kinds, concurrency=concurrency, loglevel=loglevel, results=results,
                   batch_size=batch_size)


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda r: r["ops_s"])
    return ordered[(len(ordered) - 1) // 2]


def _report(
    count: int, rounds: int, kinds: Sequence[str], *, concurrency: int, loglevel: str,
    results: dict[str, dict[str, list[dict[str, Any]]]], batch_size: int,
) -> tuple[dict[str, Any], str]:
    info = machine()
    rows, summary, problems = [], [], []
    batching = "one task per op" if batch_size == 1 else f"batches of {batch_size} ops per task"
    for kind in kinds:
        replay, raw = _median(results[kind]["replay"]), _median(results[kind]["raw"])
        ratio = replay["ops_s"] / raw["ops_s"]
        goal = batch_size > 1 and kind in ("incrby", "rpush")
        for side in ("replay", "raw"):
            for r in results[kind][side]:
                if r["applied_keys"] != count or r.get("wrong_values") or r["left_in_queue"]:
                    problems.append(f"{kind} {side}: {r['applied_keys']:,} of {count:,} keys, "
                                    f"{r.get('wrong_values', 0)} wrong values, {r['left_in_queue']} left queued")
        rows.append([
            kind, round(replay["ops_s"]), round(replay["steady_10_90_ops_s"]), round(raw["ops_s"]),
            round(raw["steady_10_90_ops_s"]), round(ratio, 2), round(replay["cpu_us_per_op"]),
            round(raw["cpu_us_per_op"]), round(replay["cpu_parent_us_per_op"]), round(raw["cpu_parent_us_per_op"]),
            round(replay["redis_us_per_op"], 2), round(raw["redis_us_per_op"], 2),
        ])
        summary.append({
            "what": f"worker replay, {kind}, {batching}", "unit": "ops/s", "project": replay["ops_s"],
            "raw": raw["ops_s"], "raw_what": "plain Celery task, same commands" + (
                "" if batch_size == 1 else " in one pipeline"), "ratio": ratio,
            "goal": f">= {BATCHED_GOAL:g}x raw" if goal else None, "met": ratio >= BATCHED_GOAL if goal else None,
        })
    headers = ["workload", "replay ops/s", "replay steady 10-90%", "raw task ops/s", "raw steady 10-90%",
               "replay / raw", "replay CPU us/op", "raw CPU us/op", "of which worker parent (replay)",
               "of which worker parent (raw)", "target Redis us/op (replay)", "target Redis us/op (raw)"]
    per_round = markdown_table(
        ["round", *(f"{k} {side}" for k in kinds for side in ("replay", "raw"))],
        [[i + 1, *(round(results[k][side][i]["ops_s"]) for k in kinds for side in ("replay", "raw"))]
         for i in range(rounds)],
    )
    lines = [
        f"# {NAME}: replay task vs a raw Celery task doing the same redis-py command",
        "",
        f"{count:,} ops ({batching}) queued in a Redis Celery broker before the worker starts; "
        "replay tasks are `replay` (one op) or `replay_batch` (a batch) exactly as the bridge sends them, the raw "
        "tasks `bench.raw_command` (one command) or `bench.raw_pipeline` (a batch in one pipeline); "
        "`celery worker -P prefork "
        f"-c {concurrency} -l {loglevel}`, prefetch multiplier 4, late ack, no result; target Redis polled "
        "(INFO commandstats: the workload's command, run directly or inside a Lua step) every "
        f"{POLL_INTERVAL * 1000:g} ms, timed from the first to the last applied op; "
        f"{rounds} round(s), median shown.",
        "",
        markdown_table(headers, rows),
        "",
        "- `set`: SET key value PXAT t (~140-byte value), idempotent: its replay needs no dedupe marker, but "
        "checks and raises the key's write stamps in the Lua step; `incrby`: INCRBY, not idempotent: its replay "
        "runs in the Lua step with a dedupe marker and the stamps, the raw task runs a bare INCRBY; `rpush`: RPUSH "
        "of one item to a list of its own, not idempotent either. Batched replays send up to 200 ops per Lua "
        "step (`apply_batch.lua`)",
        "- CPU us/op: CPU time of the worker's main process and its pool children per op (from /proc); the "
        "main process consumes from the broker and feeds the children",
        "- every run's applied keys are counted at the end (and INCRBY values checked)",
        "- target Redis us/op: the time the target spent running commands (INFO commandstats: the Lua steps' "
        "EVALSHA time for replays, every command for raw tasks), per op; the replay's Lua step checks the dedupe "
        "marker and the write stamps, sets the marker and raises the stamps beside the command itself",
    ]
    if problems:
        lines.insert(2, f"**WARNING: not every op was applied exactly once: {'; '.join(problems)}**\n")
    lines += ["", "Per round (ops/s):", "", per_round, "", f"Machine: {describe_machine(info)}", "",
              f"Code measured: {describe_code(code_under_test())}"]
    payload = {
        "ops": count, "rounds": rounds, "batch_size": batch_size, "workloads": list(kinds), "concurrency": concurrency,
        "pool": "prefork",
        "loglevel": loglevel, "celery_broker": "redis", "results": results, "summary": summary,
        "problems": problems, "servers": server_versions(), "code": code_under_test(), "machine": info,
    }
    return payload, "\n".join(lines)


def profile(count: int, concurrency: int, loglevel: str, kind: str, batch_size: int = 1) -> int:
    """The replay row under py-spy (CPU, every worker process); prints the top functions per role."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    raw_path = RESULTS_DIR / f"{NAME}.profile-{kind}{'' if batch_size == 1 else f'-batch{batch_size}'}.txt"
    workload = Workload.build(kind, count)
    with redis_server() as celery_broker, redis_server() as target, \
            tempfile.TemporaryDirectory(prefix="crr-bench-worker-") as workdir:
        result = run_one(celery_broker.url, target.url, Path(workdir), workload, "replay", concurrency=concurrency,
                         loglevel=loglevel, batch_size=batch_size, profile_to=raw_path)
    child = summarize_collapsed(raw_path, top=30, within="Worker.workloop")
    everything = summarize_collapsed(raw_path, top=30)
    print(f"worker under py-spy ({kind} replay): {result['ops_s']:,.0f} ops/s (slowed by sampling), CPU samples only\n")
    print(f"pool children ({child['samples']:,} samples):\n")
    print(markdown_table(["self (leaf) frame", "% of child samples"], child["self"]))
    print()
    print(markdown_table(["inclusive frame", "% of child samples"], child["inclusive"]))
    print(f"\nall worker processes ({everything['samples']:,} samples; the rest is the main process):\n")
    print(markdown_table(["self (leaf) frame", "% of all samples"], everything["self"][:20]))
    summary_path = raw_path.with_suffix(".json")
    summary_path.write_text(json.dumps({"workload": kind, "batch_size": batch_size, "run": result, "children": child,
                                        "all": everything, "code": code_under_test()}, indent=2))
    print(f"\ncollapsed stacks: {raw_path}; summary {summary_path}")
    return 0


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", type=int, default=10_000, help="tasks per run (default 10,000)")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each row (default 1)")
    parser.add_argument("--workloads", default="set,incrby,rpush", help="set, incrby, rpush (default all)")
    parser.add_argument("--concurrency", type=int, default=2, help="worker -c (default 2)")
    parser.add_argument("--loglevel", default="INFO", help="worker -l (default INFO)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="ops per task (default 1: replay vs raw_command; >1: replay_batch vs raw_pipeline)")
    parser.add_argument("--json", metavar="PATH", help=f"results file (default {RESULTS_DIR}/{NAME}.json; .md beside)")
    parser.add_argument("--profile", action="store_true", help="run the first workload's replay row under py-spy")
    args = parser.parse_args(list(argv))
    kinds = [k.strip() for k in args.workloads.split(",") if k.strip()]
    known = {"set", "incrby", "rpush"}
    if args.ops < 100 or args.rounds < 1 or args.batch_size < 1 or not kinds or not set(kinds) <= known:
        parser.error("--ops >= 100, --rounds >= 1, --workloads among set,incrby,rpush")
    if args.profile:
        return profile(args.ops, args.concurrency, args.loglevel, kinds[0], args.batch_size)
    payload, markdown = run(args.ops, args.rounds, kinds, concurrency=args.concurrency, loglevel=args.loglevel,
                            batch_size=args.batch_size)
    publish_results(NAME, payload, markdown, args.json, args.batch_size)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
