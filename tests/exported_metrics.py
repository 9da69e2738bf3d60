"""The Prometheus series the three roles export, read from their collectors (nothing is served).

The alert rules and the Grafana dashboard in examples/ may only read these.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from celery_redis_retry import metrics
from celery_redis_retry.bridge.circuits import CircuitState
from celery_redis_retry.bridge.loop import BridgeStats


def _family_names(families: Iterator[Any]) -> set[str]:
    """The series names of metric families, as a scrape shows them (counters get ``_total``)."""
    names = set()
    for family in families:
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names |= {f"{family.name}_bucket", f"{family.name}_count", f"{family.name}_sum"}
        else:
            names.add(family.name)
    return names


def exported_names(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Every series the three roles serve."""
    import prometheus_client

    monkeypatch.setattr(metrics, "serve", lambda _port, collector, **_kw: collector)
    # serve_worker_metrics sets them; put them back after
    monkeypatch.setattr(metrics, "_outcome_counts", None)
    monkeypatch.setattr(metrics, "_latencies", None)
    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    metrics.register_producer_metrics(registry)
    names = _family_names(registry.collect())
    bridge = SimpleNamespace(
        stats=BridgeStats(), reading_paused=False, assigned_partitions=0, in_flight=0, retrying_ops=0,
        oldest_retrying_seconds=1.0, partition_lag={("redis-retry-queue", 0): 5},
        circuits=SimpleNamespace(snapshot=lambda: [CircuitState("default", "open", 0.0, "down", 1)]),
    )
    names |= _family_names(metrics.serve_bridge_metrics(bridge, 0).collect())  # type: ignore[arg-type]
    names |= _family_names(metrics.serve_worker_metrics(0).collect())
    return names
