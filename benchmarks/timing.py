"""Timing and statistics of the benchmarks: percentiles of samples, the clock's own cost, rates."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence


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


def rate(count: int, seconds: float) -> float:
    """``count / seconds``, 0 when no time passed."""
    return count / seconds if seconds > 0 else 0.0
