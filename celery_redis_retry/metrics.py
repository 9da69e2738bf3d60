"""Prometheus metrics for the three roles (optional: ``pip install celery-redis-retry[metrics]``).

Every figure is a counter the code keeps anyway (``ProducerStats``, ``BridgeStats``, the
replay outcomes), read when Prometheus scrapes, so that turning metrics on adds nothing
to the paths that publish and replay ops.

- **Application processes**: :func:`register_producer_metrics` adds ``crr_producer_*``
  (summed over the process's producers) and ``crr_spool_messages`` to a registry, by
  default prometheus_client's global one, which the application already serves.
- **Bridge**: ``celery -A proj redis-retry bridge --metrics-port N`` (or
  ``redis_retry_bridge_metrics_port``) serves ``crr_bridge_*`` on ``:N/metrics``.
- **Worker**: with ``redis_retry_worker_metrics_port`` set, the worker's main process
  serves ``crr_replay_ops_total{outcome=...}`` and the ``crr_replay_latency_seconds``
  histogram (capture to outcome) on that port. The prefork children count
  into shared memory created before they fork, so the figures survive a child being
  replaced (``--max-tasks-per-child``) and need no ``PROMETHEUS_MULTIPROC_DIR``.
"""

from __future__ import annotations

import bisect
import itertools
import multiprocessing
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from celery_redis_retry.errors import ConfigurationError

if TYPE_CHECKING:
    from celery_redis_retry.bridge.loop import Bridge

#: The outcomes a replay can count, in flow order (``retrying``: sent back with a countdown).
OUTCOMES = ("applied", "duplicate", "superseded", "expired", "retrying", "waiting", "dead", "rejected")


def _client() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise ConfigurationError(
            "metrics need the prometheus_client package: pip install 'celery-redis-retry[metrics]'"
        ) from None
    return prometheus_client


def _family(kind: str, name: str, documentation: str, value: float) -> Any:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    family = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily}[kind]
    return family(name, documentation, value=value)


class _Collector:
    """A prometheus_client collector whose families come from ``collect_families``."""

    def __init__(self, collect_families: Callable[[], Iterator[Any]]) -> None:
        self._collect_families = collect_families

    def collect(self) -> Iterator[Any]:
        return self._collect_families()


def serve(port: int, collector: _Collector, *, addr: str = "0.0.0.0") -> Any:  # noqa: S104 - a scrape target
    """Serve ``collector`` (and nothing else) on ``addr:port/metrics`` from a daemon thread."""
    client = _client()
    registry = client.CollectorRegistry(auto_describe=True)
    registry.register(collector)
    try:
        return client.start_http_server(port, addr=addr, registry=registry)
    except OSError as exc:
        raise ConfigurationError(f"cannot serve metrics on port {port}: {exc}") from None


# -- application processes ---------------------------------------------------------------


def register_producer_metrics(registry: Any = None) -> None:
    """Add the producers' counters of this process to ``registry`` (default: the global one)."""
    client = _client()

    def families() -> Iterator[Any]:
        from celery_redis_retry.capture.producer import _live_producers

        producers = list(_live_producers)
        for field, help_text in (
            ("published", "Ops handed to Kafka or the spool by publish()"),
            ("spooled", "Ops written to the local spool instead of Kafka"),
            ("drained", "Spooled ops republished to Kafka"),
            ("delivery_failures", "Delivery reports that failed (those ops went to the spool)"),
            ("spool_full", "Ops refused because the spool was full"),
            ("recreated", "Producers recreated after a fatal librdkafka error"),
        ):
            yield _family("counter", f"crr_producer_{field}", help_text,
                          sum(getattr(p.stats, field) for p in producers))
        spools = {p.spool.path: p.spool for p in producers}
        yield _family("gauge", "crr_spool_messages", "Ops waiting in this host's spool",
                      sum(s.count() for s in spools.values()))

    (registry or client.REGISTRY).register(_Collector(families))


# -- bridge --------------------------------------------------------------------------------


def serve_bridge_metrics(bridge: Bridge, port: int) -> Any:
    """Serve the counters of ``bridge`` on ``port``."""

    def families() -> Iterator[Any]:
        stats = bridge.stats
        yield _family("counter", "crr_bridge_ops_dispatched", "Ops handed to Celery", stats.dispatched)
        yield _family("counter", "crr_bridge_tasks_sent", "Celery tasks sent (a batch is one task)", stats.tasks)
        yield _family("counter", "crr_bridge_ops_rejected", "Messages written to the DLQ as rejected",
                      stats.rejected)
        yield _family("counter", "crr_bridge_stalls", "Hand-overs refused: a partition paused and rewound",
                      stats.stalls)
        yield _family("counter", "crr_bridge_backpressure_pauses",
                      "Times reading paused because the Celery queue reached the high-water mark", stats.held)
        yield _family("gauge", "crr_bridge_backpressure_active", "1 while reading is paused by backpressure, else 0",
                      int(bridge.reading_paused))
        yield _family("gauge", "crr_bridge_assigned_partitions", "Partitions this bridge owns",
                      bridge.assigned_partitions)
        yield _family("counter", "crr_bridge_ops_parked", "Ops moved to a waiting topic: their target was down",
                      stats.parked)
        yield _family("counter", "crr_bridge_ops_expired", "Ops past their deadline or redis_retry_max_age",
                      stats.expired)
        yield _family("gauge", "crr_bridge_ops_in_flight", "Ops handed to Celery that have not ended yet",
                      bridge.in_flight)
        yield _family("counter", "crr_bridge_ops_handed_over_again",
                      "Ops handed over again: their task left the Celery queue and they had not ended within "
                      "redis_retry_redelivery_timeout", stats.redelivered)
        yield _family("gauge", "crr_bridge_ops_retrying",
                      "Ops in flight that a worker scheduled again with a countdown (a retry) and that have not "
                      "ended since", bridge.retrying_ops)
        oldest = bridge.oldest_retrying_seconds
        if oldest is not None:
            yield _family("gauge", "crr_bridge_oldest_retrying_seconds",
                          "Seconds since the longest-waiting of those ops was first scheduled for a retry", oldest)
        yield _family("gauge", "crr_bridge_ops_late",
                      "Ops past redis_retry_redelivery_timeout whose task still waits in the Celery queue",
                      stats.late)
        yield _lag_family(bridge)
        yield from _circuit_families(bridge)

    return serve(port, _Collector(families))


def _lag_family(bridge: Bridge) -> Any:
    from prometheus_client.core import GaugeMetricFamily

    lag = GaugeMetricFamily(
        "crr_bridge_partition_lag",
        "Ops in each owned partition of the retry topic past the bridge's commit point (not ended yet), "
        "as Kafka consumer-lag exporters count them",
        labels=["topic", "partition"],
    )
    for (topic, partition), ops in sorted(bridge.partition_lag.items()):
        lag.add_metric([topic, str(partition)], ops)
    return lag


def _circuit_families(bridge: Bridge) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    from celery_redis_retry.bridge.circuits import CLOSED, OPEN, PAUSED, RECOVERING

    state = GaugeMetricFamily("crr_bridge_circuit_state", "1 for the state each target's circuit is in now",
                              labels=["target", "state"])
    opened = CounterMetricFamily("crr_bridge_circuit_opened", "Times each target's circuit opened",
                                 labels=["target"])
    for circuit in bridge.circuits.snapshot():
        for name in (CLOSED, OPEN, RECOVERING, PAUSED):
            state.add_metric([circuit.target, name], int(circuit.state == name))
        opened.add_metric([circuit.target], circuit.opened)
    yield state
    yield opened


# -- worker --------------------------------------------------------------------------------

_outcome_counts: Any = None  # a shared multiprocessing.Array, once the worker serves metrics
#: Upper bounds (seconds) of the capture-to-outcome histogram's buckets: from an op replayed
#: at once to one that waited out an hour-long outage.
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0)
_latencies: Any = None  # shared: a count per bucket (the last one: above every bound), then the sum


def count_outcomes(outcomes: dict[str, int]) -> None:
    """Add replay outcomes (from any worker process); nothing unless metrics are served."""
    counts = _outcome_counts
    if counts is None:
        return
    with counts.get_lock():
        for outcome, n in outcomes.items():
            counts[OUTCOMES.index(outcome)] += n


def observe_latency(seconds: float) -> None:
    """Count how long an op took from capture to its outcome on the target; nothing unless metrics are served."""
    latencies = _latencies
    if latencies is None:
        return
    bucket = bisect.bisect_left(LATENCY_BUCKETS, seconds)
    with latencies.get_lock():
        latencies[bucket] += 1
        latencies[-1] += seconds


def serve_worker_metrics(port: int) -> Any:
    """In the worker's main process, before it forks: count outcomes and latencies, and serve them."""
    global _outcome_counts, _latencies
    _client()  # fail at start, not at the first scrape, when prometheus_client is missing
    context = multiprocessing.get_context("fork")
    counts = _outcome_counts = context.Array("q", len(OUTCOMES))
    latencies = _latencies = context.Array("d", len(LATENCY_BUCKETS) + 2)

    def families() -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        family = CounterMetricFamily("crr_replay_ops", "Ops replayed by this worker, by outcome", labels=["outcome"])
        with counts.get_lock():
            values = counts[:]
        for outcome, value in zip(OUTCOMES, values, strict=True):
            family.add_metric([outcome], value)
        yield family
        with latencies.get_lock():
            *per_bucket, total = latencies[:]
        cumulative = list(itertools.accumulate(per_bucket))
        yield HistogramMetricFamily(
            "crr_replay_latency_seconds",
            "Seconds from an op's capture to its outcome on the target (applied, duplicate or superseded)",
            buckets=[*((f"{bound:g}", n) for bound, n in zip(LATENCY_BUCKETS, cumulative, strict=False)),
                     ("+Inf", cumulative[-1])],
            sum_value=total,
        )

    return serve(port, _Collector(families))
