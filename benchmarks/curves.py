"""The sweeps of ``bench_drain --curve NAME``: which drains a curve runs, and what its safety switches cost.

A curve is a list of :class:`Planned` drains, each a full drain of its own backlog in the
same run. The ``safety`` curve drains each feature ON (the package's way) and OFF in turn,
alternating, so that a slow spell of the shared machine hits both alike; :func:`costs`
then gives the throughput each feature costs.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .drain_point import Point
from .workload import describe_mix, non_idempotent_mix

#: Committing after end may cost at most this share of the throughput of committing at hand-over.
COST_GOAL = 0.10


@dataclass(frozen=True)
class Planned:
    """One drain of a run: its row label, its settings, and the safety feature it switches (if any)."""

    label: str
    point: Point
    feature: str | None = None
    on: bool | None = None


@dataclass(frozen=True)
class Curve:
    """A sweep: its title, its default values (``--points`` replaces them) and how a value makes a drain."""

    title: str
    values: tuple[str, ...]
    plan: Callable[[Point, str], list[Planned]]
    help: str


def _size(base: Point, value: str) -> list[Planned]:
    ops = int(value)
    return [Planned(f"{ops:,} ops", base.with_(ops=ops))]


def _batch(base: Point, value: str) -> list[Planned]:
    size = int(value)
    return [Planned(f"batch size {size:,}", base.with_(batch_size=size))]


def _targets(base: Point, value: str) -> list[Planned]:
    count = int(value)
    return [Planned(f"{count} target{'s' if count > 1 else ''}", base.with_(targets=count))]


def _non_idempotent(base: Point, value: str) -> list[Planned]:
    percent = float(value)
    if not 0 <= percent <= 100:
        raise ValueError(f"a share of non-idempotent ops is 0-100 %, not {value}")
    return [Planned(f"{percent:g}% INCRBY/RPUSH", base.with_(mix=non_idempotent_mix(percent)))]


#: The safety features: (what the rows say, the Point field, its ON value, its OFF value).
FEATURES: dict[str, tuple[str, str, Any, Any]] = {
    "stamps": ("write stamps (redis_retry_write_stamps)", "write_stamps", True, False),
    "commit": ("end-to-end acknowledgement (redis_retry_commit_after end vs handover)", "commit_after", "end",
               "handover"),
    "signing": ("message signing (redis_retry_signing_keys)", "signing", True, False),
    "durable": ("durable publish (redis_retry_durable_publish)", "durable_publish", True, False),
}


def _safety(base: Point, value: str) -> list[Planned]:
    if value not in FEATURES:
        raise ValueError(f"unknown safety feature {value!r} (known: {', '.join(FEATURES)})")
    what, name, on, off = FEATURES[value]
    return [Planned(f"{what} ON", base.with_(**{name: on}), value, True),
            Planned(f"{what} OFF", base.with_(**{name: off}), value, False)]


CURVES: dict[str, Curve] = {
    "size": Curve("backlog size", ("10000", "100000", "1000000"), _size,
                  "backlogs of 10k, 100k and 1M ops (1M needs --kafka apache or tansu)"),
    "batch": Curve("batch size (redis_retry_batch_size)", ("1", "100", "1000", "5000"), _batch,
                   "redis_retry_batch_size 1, 100, 1000 (the default), 5000"),
    "targets": Curve("number of targets", ("1", "2", "4"), _targets,
                     "1, 2 and 4 target redis-servers, ops spread evenly by key"),
    "non-idempotent": Curve("share of non-idempotent ops", ("0", "25", "50", "100"), _non_idempotent,
                            "0, 25, 50 and 100% of INCRBY/RPUSH among SET/HSET/DEL"),
    "safety": Curve("safety features ON vs OFF", tuple(FEATURES), _safety,
                    "each of write stamps, end-to-end acknowledgement, signing and durable publish ON and OFF, "
                    "alternating"),
}


def plan(curve: str, base: Point, values: list[str] | None, repeat: int) -> list[Planned]:
    """The drains of ``curve`` in run order; each value ``repeat`` times (ON/OFF pairs stay adjacent).

    :raises ValueError: naming an unknown curve or a value it cannot take.
    """
    if curve not in CURVES:
        raise ValueError(f"unknown curve {curve!r} (known: {', '.join(CURVES)})")
    chosen = CURVES[curve]
    planned = []
    for value in values or chosen.values:
        try:
            drains = chosen.plan(base, value)
        except ValueError as exc:
            raise ValueError(f"--curve {curve}: {exc}") from None
        planned += drains * repeat
    return planned


def default_plan(base: Point, batch_sizes: list[int | None], commit_after: list[str], repeat: int) -> list[Planned]:
    """Without ``--curve``: each batch size with each commit mode, the modes alternating ``repeat`` times."""
    planned = []
    for size in batch_sizes:
        batch = "package default batch size" if size is None else f"batch size {size:,}"
        for _ in range(repeat):
            for mode in commit_after:
                planned.append(Planned(f"{batch}, commit {'after end' if mode == 'end' else 'at hand-over'}",
                                       base.with_(batch_size=size, commit_after=mode), f"commit, {batch}",
                                       mode == "end"))
    return planned


def describe_point(point: Point) -> str:
    """The settings a curve's drains share, for the report."""
    batch = "the package default" if point.batch_size is None else f"{point.batch_size:,}"
    return (f"{point.ops:,} ops of {describe_mix(point.mix)}, {point.targets} target(s), redis_retry_batch_size "
            f"{batch}, commit after {point.commit_after}, write stamps {'on' if point.write_stamps else 'off'}, "
            f"signing {'on' if point.signing else 'off'}, durable publish {'on' if point.durable_publish else 'off'}, "
            f"one bridge and one `celery worker -P prefork -c {point.concurrency} -l {point.loglevel}`")


def costs(results: list[tuple[Planned, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per switched feature: medians ON and OFF of throughput (from launch, first to last) and publish time."""
    rows = []
    for feature in dict.fromkeys(p.feature for p, _ in results if p.feature):
        on = [r for p, r in results if p.feature == feature and p.on]
        off = [r for p, r in results if p.feature == feature and p.on is False]
        if not on or not off:
            continue

        def median(runs: list[dict[str, Any]], key: str) -> float | None:
            values = [r[key] for r in runs if r[key] is not None]
            return float(statistics.median(values)) if values else None

        row: dict[str, Any] = {"feature": feature, "what": FEATURES[feature][0] if feature in FEATURES else feature,
               "runs": len(on)}
        for key in ("ops_s", "ops_s_first_to_last", "publish_s"):
            row[f"on_{key}"], row[f"off_{key}"] = median(on, key), median(off, key)
        row["cost_pct"] = _cost(row["on_ops_s"], row["off_ops_s"])
        row["cost_first_to_last_pct"] = _cost(row["on_ops_s_first_to_last"], row["off_ops_s_first_to_last"])
        # Publish costs time: ON taking twice as long is a 50% cost in publish throughput.
        row["publish_cost_pct"] = _cost(row["off_publish_s"], row["on_publish_s"])
        row["pair_ratios"] = [round(a["ops_s"] / b["ops_s"], 3) for a, b in zip(on, off, strict=False) if b["ops_s"]]
        # The steady drain (first to last applied) is what a feature slows; durable publish
        # slows publishing only. Group joins, the same ON and OFF, are left out.
        judged = "publish_cost_pct" if feature == "durable" else "cost_first_to_last_pct"
        if row[judged] is None:
            judged = "cost_pct"
        row["judged"] = judged
        row["goal"] = f"cost <= {100 * COST_GOAL:g}%"
        row["met"] = row[judged] is not None and row[judged] <= 100 * COST_GOAL
        rows.append(row)
    return rows


def _cost(on: float | None, off: float | None) -> float | None:
    """How much lower ``on`` is than ``off``, in % of ``off`` (negative: ON was faster; None: not measured)."""
    return round(100 * (1 - on / off), 1) if on is not None and off else None
