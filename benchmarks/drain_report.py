"""The results of a drain run (``bench_drain``, with or without ``--curve``): JSON payload, markdown, summary rows.

A run's table has one row per drain (a curve: one per point); every row names the Kafka
broker. The summary has one row per goal: every op applied at every point, RSS flat within
10% after warm-up at every point, and the cost of committing after end where it was measured.
"""

from __future__ import annotations

import statistics
from typing import Any

from .curves import Planned, costs, describe_point
from .drain_point import PROCESSES, RAW_PIPELINE, RSS_GOAL_PCT, WARM_SHARE, Point
from .machine import code_under_test, describe_code, describe_machine, machine, server_versions
from .output import markdown_table
from .stack import kafka_description
from .workload import DEFAULT_MIX, describe_mix

#: The drain goal at the package defaults: this share of raw redis-py's rate, first to last applied.
DRAIN_GOAL = 0.5
#: The drain rate at 1M ops is at most this share below the rate at 100k (a backlog ten
#: times larger must not drain slower per op).
SIZE_GOAL = 0.10
#: The package defaults, as a point (its ``ops`` is set to each run's).
DEFAULT_POINT = Point(ops=100_000, mix=DEFAULT_MIX)


def build(name: str, title: str, kind: str, base: Point, *, runs: list[tuple[Planned, dict[str, Any]]],
          extra: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The payload and the markdown of a run named ``name`` (``bench_drain`` or ``bench_drain-<curve>``),
    whose drains change ``base`` as their labels say."""
    info = machine()
    cost_rows = costs(runs)
    rows = summary(title, kind, runs, cost_rows)
    lines = [
        f"# {name}: {title}, {kind} Kafka",
        "",
        "Each row is a full drain in the same run: a backlog published with RetryProducer to new topics "
        f"(4 partitions) on {kafka_description(kind)}, then drained into flushed targets (Redis as the Celery "
        f"broker). Unless the row says otherwise: {describe_point(base)}. Raw: redis-py pipelines of "
        f"{RAW_PIPELINE:,} of exactly the same commands from one process, right after the drain, on the same "
        "targets.",
        "",
        markdown_table(["drain", "Kafka", "ops", "mix", "applied", "publish s", "launch to first s",
                        "ops/s from launch", "ops/s first to last", "raw ops/s", "/ raw", "Celery queue peak"],
                       [_row(kind, p, r) for p, r in runs]),
        "",
        f"Memory (VmRSS, MiB) at warm-up ({100 * WARM_SHARE:g}% of the backlog applied: buffers have filled), peak, "
        "and late growth (the second half's peak over "
        f"the first half's, %); flat: every process stayed within {RSS_GOAL_PCT:g}% of its warm-up RSS:",
        "",
        markdown_table(["drain", "Kafka", *(f"{p} {what}" for p in PROCESSES for what in ("warm", "peak", "late %")),
                        f"flat within {RSS_GOAL_PCT:g}% after warm-up"],
                       [_memory_row(kind, p, r) for p, r in runs]),
        "",
    ]
    if cost_rows:
        lines += _cost_table(kind, cost_rows)
    missing = [f"{p.label} {r['applied']:,} of {r['ops']:,}" for p, r in runs if not r["all_applied"]]
    if missing:
        lines.insert(2, "**WARNING: not every op was applied: " + "; ".join(missing) + ".**\n")
    lines += [f"Machine: {describe_machine(info)}", "", f"Code measured: {describe_code(code_under_test())}"]
    payload = {
        **extra, "kafka": kind, "kafka_description": kafka_description(kind), "celery_broker": "redis",
        "drains": [{"label": p.label, "feature": p.feature, "on": p.on, **r} for p, r in runs],
        "costs": cost_rows, "summary": rows, "servers": server_versions(), "code": code_under_test(),
        "machine": info,
    }
    return payload, "\n".join(lines)


def _row(kind: str, planned: Planned, result: dict[str, Any]) -> list[Any]:
    raw = result["raw"]
    return [planned.label, kind, result["ops"], describe_mix(planned.point.mix), result["applied"],
            round(result["publish_s"], 1), round(result["launch_to_first_s"], 1), round(result["ops_s"]),
            _rounded(result["ops_s_first_to_last"]), round(raw["ops_s"]), f"{result['ratio']:.4f}",
            result["celery_queue_peak"]]


def _memory_row(kind: str, planned: Planned, result: dict[str, Any]) -> list[Any]:
    cells: list[Any] = [planned.label, kind]
    for process in PROCESSES:
        part = result["rss"].get(process, {})
        cells += [_dash(part.get("warm_mib")), _dash(part.get("peak_mib")), _dash(part.get("late_growth_pct"))]
    return [*cells, result["flat"]]


def _cost_table(kind: str, rows: list[dict[str, Any]]) -> list[str]:
    table = [[r["what"], kind, r["runs"], _rounded(r["on_ops_s"]), _rounded(r["off_ops_s"]), _dash(r["cost_pct"]),
              _dash(r["cost_first_to_last_pct"]), _rounded(r["on_publish_s"], 2), _rounded(r["off_publish_s"], 2),
              _dash(r["publish_cost_pct"]), ", ".join(f"{x:.3f}" for x in r["pair_ratios"])] for r in rows]
    return [
        "What each feature costs (medians of its ON and OFF drains; cost: how much lower ON's throughput is, in % "
        "of OFF's; publish cost: how much lower ON's publish throughput is):",
        "",
        markdown_table(["feature", "Kafka", "runs each", "ON ops/s", "OFF ops/s", "cost % (from launch)",
                        "cost % (first to last)", "ON publish s", "OFF publish s", "publish cost %",
                        "ON / OFF per pair"], table),
        "",
    ]


def summary(title: str, kind: str, runs: list[tuple[Planned, dict[str, Any]]],
             cost_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per goal of the run."""
    worst = max((part.get("warm_growth_pct") or 0.0 for _, r in runs for part in r["rss"].values()), default=0.0)
    slowest = min(runs, key=lambda run: run[1]["ratio"] or 0.0)
    rows = [
        {"what": f"drain end to end, {title}, {kind} Kafka: every op applied at every point (slowest point: "
                 f"{slowest[0].label})", "unit": "ops/s", "project": slowest[1]["ops_s"],
         "raw": slowest[1]["raw"]["ops_s"], "raw_what": f"redis-py pipelines of {RAW_PIPELINE}",
         "ratio": slowest[1]["ratio"], "goal": "all applied", "met": all(r["all_applied"] for _, r in runs)},
        {"what": f"RSS growth after warm-up, {title}, {kind} Kafka: bridge, worker main and child at every point "
                 "(worst)", "unit": "%", "project": worst, "raw": None, "raw_what": None, "ratio": None,
         "goal": f"<= {RSS_GOAL_PCT:g}% after warm-up ({100 * WARM_SHARE:g}% applied)",
         "met": all(r["flat"].startswith("met") for _, r in runs)},
    ]
    defaults = [r for p, r in runs if p.point == DEFAULT_POINT and r["ops_s_first_to_last"]]
    if defaults:
        rate = statistics.median(r["ops_s_first_to_last"] for r in defaults)
        raw = statistics.median(r["raw"]["ops_s"] for r in defaults)
        launch = statistics.median(r["ops_s"] for r in defaults)
        rows.append({"what": f"drain of {DEFAULT_POINT.ops:,} mixed ops at the package defaults, first to last "
                             f"applied, {kind} Kafka, median of {len(defaults)} ({launch:,.0f} ops/s from launch)",
                     "unit": "ops/s", "project": rate, "raw": raw, "raw_what": f"redis-py pipelines of {RAW_PIPELINE}",
                     "ratio": rate / raw, "goal": f">= {DRAIN_GOAL:g}x raw", "met": rate / raw >= DRAIN_GOAL})
    by_size = {r["ops"]: r for p, r in runs if p.feature is None and r["ops_s_first_to_last"]}
    if 100_000 in by_size and 1_000_000 in by_size:
        small, large = by_size[100_000]["ops_s_first_to_last"], by_size[1_000_000]["ops_s_first_to_last"]
        rows.append({"what": f"drain rate at 1M ops vs at 100k ops, first to last applied, {kind} Kafka",
                     "unit": "ops/s", "project": large, "raw": small, "raw_what": "the same drain of 100k ops",
                     "ratio": large / small, "goal": f"no more than {100 * SIZE_GOAL:g}% slower",
                     "met": large / small >= 1 - SIZE_GOAL})
    for cost in cost_rows:
        judged = cost.get("judged", "cost_pct")
        on, off = (("on_publish_s", "off_publish_s") if judged == "publish_cost_pct" else
                   ("on_ops_s_first_to_last", "off_ops_s_first_to_last") if judged == "cost_first_to_last_pct" else
                   ("on_ops_s", "off_ops_s"))
        publish = judged == "publish_cost_pct"
        rows.append({"what": f"{cost['what']}: {'publish time' if publish else 'drain throughput'} ON vs OFF, "
                             f"{kind} Kafka, median of {cost['runs']} (cost {cost[judged]}%)",
                     "unit": "s" if publish else "ops/s", "project": cost[on], "raw": cost[off],
                     "raw_what": "the same run with the feature OFF",
                     "ratio": cost[on] / cost[off] if cost[on] and cost[off] else None,
                     "goal": cost["goal"], "met": cost["met"]})
    return rows


def _rounded(value: float | None, digits: int | None = None) -> Any:
    return "-" if value is None else round(value, digits)


def _dash(value: Any) -> Any:
    return "-" if value is None else value
