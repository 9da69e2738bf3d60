"""The sizing guide of ``docs/performance.md``, computed from the measured drains.

A drain's samples hold each process's CPU time (``/proc``): from the first op applied to the
last, the bridge, the worker's main process and one pool child each spent so many
microseconds of CPU per op. On this 2-core machine every process shares the cores, so the
rates below are what one process would do with a core of its own: an estimate on paper for
larger machines, from measured CPU costs, not a measured rate. The target's share comes from
``bench_worker``'s Redis time per replayed op (INFO commandstats). Nothing here measures
anything.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from .output import markdown_table

#: Outages (failed writes per second, seconds down) and drain deadlines the example table sizes for.
EXAMPLES = ((5_000, 60, 60), (20_000, 300, 300), (50_000, 600, 300), (100_000, 1800, 900), (200_000, 3600, 1800))
#: Bytes a captured op takes in Kafka, about (the benchmarks' ops: 260-400 bytes with their headers).
OP_BYTES = 350


def _cpu_us_per_op(drain: dict[str, Any], process: str) -> float | None:
    """CPU microseconds per op of ``process`` between the first op applied and the end of the drain."""
    samples = (drain.get("rss") or {}).get(process, {}).get("samples") or []
    first = drain.get("launch_to_first_s")
    if len(samples) < 2 or first is None or not drain.get("applied"):
        return None
    warm = next((s for s in samples if s["t"] >= first), samples[-1])
    spent_ms = samples[-1]["cpu_ms"] - warm["cpu_ms"]
    return spent_ms * 1000 / drain["applied"] if spent_ms > 0 else None


def costs(results: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Median CPU per op of each role over the drains at the package defaults, and the target's share."""
    drains = [d for name, doc in results.items() if name.startswith("bench_drain") for d in doc.get("drains", [])
              if _at_defaults(d)]
    bridge = [x for d in drains if (x := _cpu_us_per_op(d, "bridge")) is not None]
    main = [x for d in drains if (x := _cpu_us_per_op(d, "worker main")) is not None]
    child = [x for d in drains if (x := _cpu_us_per_op(d, "worker child")) is not None]
    if not (bridge and main and child):
        return None
    concurrency = drains[0]["point"].get("concurrency", 2)
    worker = results.get("bench_worker-batch1000", {}).get("results", {})
    redis_us = [r["redis_us_per_op"] for kind in worker.values() for r in kind.get("replay", [])
                if r.get("redis_us_per_op")]
    return {
        "drains": len(drains),
        "bridge_us": statistics.median(bridge),
        "worker_main_us": statistics.median(main),
        # One child was sampled; the pool's children share the ops evenly.
        "worker_child_us": statistics.median(child) * concurrency,
        "concurrency": concurrency,
        "redis_us": statistics.median(redis_us) if redis_us else None,
    }


def _at_defaults(drain: dict[str, Any]) -> bool:
    point = drain.get("point") or {}
    return (point.get("batch_size") is None and point.get("commit_after") == "end" and point.get("write_stamps")
            and not point.get("signing") and not point.get("durable_publish") and point.get("targets") == 1
            and len(point.get("mix") or {}) == 5 and drain.get("all_applied"))


def section(results: dict[str, dict[str, Any]]) -> list[str]:
    """The guide's lines (empty without a drain at the package defaults)."""
    found = costs(results)
    if found is None:
        return []
    per_process = 1e6 / (found["worker_child_us"] + found["worker_main_us"] / found["concurrency"])
    per_bridge = 1e6 / found["bridge_us"]
    redis_us = found["redis_us"]
    lines = [
        "## Sizing",
        "",
        f"From {found['drains']} drain(s) of the mixed backlog at the package defaults (write stamps, commit after "
        "end, batches of 1,000): CPU time per op from the first op applied to the last, per role. Every process "
        "shared 2 cores here, so a rate below is what one process would do with a core of its own: an estimate "
        "on paper for larger machines, not a measured rate.",
        "",
        markdown_table(["role", "CPU us per op", "ops/s per core (estimate)"], [
            ["bridge (consume, decode, hand over, commit)", round(found["bridge_us"], 1), round(per_bridge)],
            ["worker main process (Celery: fetch tasks, feed the pool)", round(found["worker_main_us"], 1),
             round(1e6 / found["worker_main_us"])],
            ["worker pool process (decode, Lua step, outcomes)", round(found["worker_child_us"], 1),
             round(1e6 / found["worker_child_us"])],
            ["one worker process, its share of the main process included", "-", round(per_process)],
            *([["target Redis, per replayed op (the Lua step)", round(redis_us, 1), round(1e6 / redis_us)]]
              if redis_us else []),
        ]),
        "",
        "An outage of D seconds at W failed writes per second leaves a backlog of B = W x D ops. To drain it "
        "within T seconds of the target's return the drain must run at R = B / T ops/s, so run at least "
        "R / (ops/s per worker process) worker processes (`-c` across all workers) and R / (ops/s per bridge) "
        "bridges (no more bridges than the topic has partitions: a partition feeds one bridge). The target must "
        "have room for the replays beside its usual load: R x (Redis us per op) / 1,000,000 of a core, on "
        "each shard of a Redis Cluster in proportion to its keys. Add half again for headroom: a drain shares "
        "the target with the application, which writes again as soon as the target answers.",
        "",
    ]
    rows = []
    for rate, down, deadline in EXAMPLES:
        backlog = rate * down
        needed = backlog / deadline
        rows.append([f"{rate:,}", down, f"{backlog:,}", f"{backlog * OP_BYTES / 2**30:.1f}", deadline, f"{needed:,.0f}",
                     math.ceil(1.5 * needed / per_process), math.ceil(1.5 * needed / per_bridge),
                     f"{100 * 1.5 * needed * redis_us / 1e6:.0f}%" if redis_us else "-"])
    lines += [
        markdown_table(["failed writes/s W", "outage s D", "backlog B", "in Kafka GiB (x replicas)", "deadline s T",
                        "drain ops/s R",
                        "worker processes (x1.5)", "bridges (x1.5)", "target core used by replays (x1.5)"], rows),
        "",
        "Where the target's share passes ~70% of a core, the drain is bounded by the target, not by workers: "
        "spread the keys over more shards, or accept a longer deadline.",
        "",
    ]
    return lines
