"""Benchmark: ``RetryProducer.publish(op)`` against raw confluent-kafka ``Producer.produce()``.

Both hand the same messages (same bytes, same keys, same topic) to librdkafka with the same
settings (``kafka.producer_config`` plus ``delivery.report.only.error``), and each call is
timed on its own with ``time.perf_counter_ns``. The difference is what the package adds
on the hot path: settings check, encoding, message key, its bookkeeping. Rows:

* ``raw produce``: ``Producer.produce(topic, value, key)`` of bytes encoded up front;
* ``publish``: ``RetryProducer.publish(op)`` of the same ops, with its spool file present
  and empty (the normal case: the spool is idle unless Kafka is down);
* ``encode only``: ``check_op`` + ``message.encode`` + ``message.message_key``, the Python
  part of ``publish`` without Kafka (to show where the difference goes);
* ``build + publish``: ``publish(ops.set(key, value, ex=3600).with_source(...)
  .with_context(trace_id=...))``, the op built in the timed call the way a service's
  capture path builds one when its write fails, from the same keys, values and trace ids.

Rounds alternate (raw, publish, encode, build + publish, raw, publish...) so that machine
noise hits every row alike; each row reports its median round (by p50). The broker is an
embedded Kafka in another process; queues are flushed between rounds so no round starts
with a backlog.

Goals: publish p50 <= 3x raw p50 (same run); build + publish p50 <= 5 us.

``--profile`` runs the build + publish path under pyinstrument instead and prints where
the time goes, with a per-stage breakdown.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from celery_redis_retry import kafka, message, ops
from celery_redis_retry.capture.producer import RetryProducer
from celery_redis_retry.config import Settings
from celery_redis_retry.ops import RedisOp

from .machine import describe_machine, machine
from .output import RESULTS_DIR, markdown_table, publish_results
from .stack import embedded_kafka
from .timing import percentiles, timer_overhead_us

NAME = "bench_publish"
GOAL_OVER_RAW_RATIO = 3.0
GOAL_BUILD_PUBLISH_P50_US = 5.0
SOURCE = "UserRepo.save"
WARMUP = 5_000
FLUSH_TIMEOUT = 120.0
STAGE_REPEATS = 7

# A cached user profile as a service would write it: ~130-150 bytes of text without JSON
# quoting, which with the envelope (id, times, target, PXAT, trace id, source) makes
# messages of ~360-390 bytes.
_PROFILE = (
    "name=User {n};email=user{n}@example.com;plan=pro;locale=en-GB;tz=Europe/London;"
    "last_login=2026-11-22T05:53:57Z;bio={bio}"
)


Fields = tuple[str, str, str]


def op_fields(count: int) -> list[Fields]:
    """Key, value (a ~140-byte profile) and trace id of ``count`` realistic SETs."""
    return [
        (f"user:{n}:profile", _PROFILE.format(n=n, bio="x" * (20 + n % 17)), f"{n * 2654435761 % 2**128:032x}")
        for n in range(count)
    ]


def build_ops(count: int) -> list[RedisOp]:
    """``count`` realistic ops: SET of a ~140-byte profile with EX, a source and a trace id."""
    return [
        ops.set(key, value, ex=3600).with_source(SOURCE).with_context(trace_id=trace)
        for key, value, trace in op_fields(count)
    ]


# -- timed loops: one per row, so no row pays for an indirection the others do not -----------


def _time_raw(producer: kafka.Producer, topic: str, pairs: Sequence[tuple[bytes, bytes]]) -> tuple[list[int], int, int]:
    produce, clock = producer.produce, time.perf_counter_ns
    samples = [0] * len(pairs)
    full = 0
    start = clock()
    for i, (key, value) in enumerate(pairs):
        t0 = clock()
        try:
            produce(topic, value, key)
        except BufferError:  # never expected at these volumes; counted, and the retry is timed
            full += 1
            producer.poll(0.05)
            produce(topic, value, key)
        samples[i] = clock() - t0
    return samples, clock() - start, full


def _time_publish(producer: RetryProducer, items: Sequence[RedisOp]) -> tuple[list[int], int, int]:
    publish, clock = producer.publish, time.perf_counter_ns
    samples = [0] * len(items)
    start = clock()
    for i, op in enumerate(items):
        t0 = clock()
        publish(op)
        samples[i] = clock() - t0
    return samples, clock() - start, 0


def _time_build_publish(producer: RetryProducer, fields: Sequence[Fields]) -> tuple[list[int], int, int]:
    # The build is spelled out here, not called through build_ops: a service's capture
    # path pays for exactly these calls, and no more.
    publish, set_, clock = producer.publish, ops.set, time.perf_counter_ns
    samples = [0] * len(fields)
    start = clock()
    for i, (key, value, trace) in enumerate(fields):
        t0 = clock()
        publish(set_(key, value, ex=3600).with_source(SOURCE).with_context(trace_id=trace))
        samples[i] = clock() - t0
    return samples, clock() - start, 0


def _time_encode(settings: Settings, items: Sequence[RedisOp]) -> tuple[list[int], int, int]:
    check, encode, key_of, clock = settings.check_op, message.encode, message.message_key, time.perf_counter_ns
    signer = settings.signer
    samples = [0] * len(items)
    start = clock()
    for i, op in enumerate(items):
        t0 = clock()
        check(op)
        encode(op, signer)
        key_of(op)
        samples[i] = clock() - t0
    return samples, clock() - start, 0


# -- the benchmark ----------------------------------------------------------------------------


class Rows:
    """Per-round results of every row, and each row's median round."""

    def __init__(self) -> None:
        self.rounds: dict[str, list[dict[str, Any]]] = {}

    def add(self, row: str, samples: list[int], wall_ns: int, flush_ns: int, extra: dict[str, Any]) -> None:
        stats = percentiles(samples)
        stats["throughput_ops_s"] = len(samples) / (wall_ns / 1e9)
        if flush_ns:
            stats["delivered_ops_s"] = len(samples) / ((wall_ns + flush_ns) / 1e9)
        self.rounds.setdefault(row, []).append({**stats, **extra})

    def p50_range(self, row: str) -> str:
        p50s = [r["p50"] for r in self.rounds[row]]
        return f"{min(p50s):.2f}-{max(p50s):.2f}"

    def median_round(self, row: str) -> dict[str, Any]:
        by_p50 = sorted(self.rounds[row], key=lambda r: r["p50"])
        return by_p50[(len(by_p50) - 1) // 2]


def _settle(*flushers: Callable[[], int]) -> None:
    for flush in flushers:
        left = flush()
        if left:
            raise SystemExit(f"{left} messages still undelivered after {FLUSH_TIMEOUT}s: is the broker alive?")
    gc.collect()


@dataclass(frozen=True)
class Workload:
    """The ops of one round, their encodings and fields, and a smaller set for the warm-up."""

    items: list[RedisOp]
    pairs: list[tuple[bytes, bytes]]
    fields: list[Fields]
    warm_items: list[RedisOp]
    warm_pairs: list[tuple[bytes, bytes]]
    warm_fields: list[Fields]

    @classmethod
    def build(cls, count: int) -> Workload:
        items, warm_items = build_ops(count), build_ops(WARMUP)
        return cls(items, _encode_all(items), op_fields(count), warm_items, _encode_all(warm_items),
                   op_fields(WARMUP))


def _encode_all(items: Sequence[RedisOp]) -> list[tuple[bytes, bytes]]:
    return [(message.message_key(op), message.encode(op)) for op in items]


def _rounds(
    rows: Rows, rounds: int, producer: RetryProducer, raw: kafka.Producer, work: Workload
) -> tuple[bool, int, int, int, int]:
    """Warm up, then the alternating rounds; return what the spool and the producer saw."""
    settings, topic = producer.settings, producer.settings.topic
    items, pairs = work.items, work.pairs

    def flush_raw() -> int:
        return int(raw.flush(FLUSH_TIMEOUT))

    def flush_publish() -> int:
        return producer.flush(FLUSH_TIMEOUT)

    # Warm-up: connections, topic metadata, the spool file, caches of both paths.
    _time_raw(raw, topic, work.warm_pairs)
    _time_publish(producer, work.warm_items)
    _time_encode(settings, work.warm_items)
    _time_build_publish(producer, work.warm_fields)
    _settle(flush_raw, flush_publish)
    spool_present = os.path.exists(producer.spool.path)
    spool_before = producer.spool.count()

    for number in range(1, rounds + 1):
        for row, timed, flush in (
            ("raw produce", lambda: _time_raw(raw, topic, pairs), flush_raw),
            ("publish", lambda: _time_publish(producer, items), flush_publish),
            ("encode only", lambda: _time_encode(settings, items), None),
            ("build + publish", lambda: _time_build_publish(producer, work.fields), flush_publish),
        ):
            samples, wall_ns, full = timed()
            flush_start = time.perf_counter_ns()
            if flush is not None:
                _settle(flush)
            flush_ns = time.perf_counter_ns() - flush_start if flush is not None else 0
            rows.add(row, samples, wall_ns, flush_ns, {"round": number, "buffer_full": full})
            del samples
            gc.collect()
        print(
            f"round {number}/{rounds}: p50 raw {rows.rounds['raw produce'][-1]['p50']:.2f} us, "
            f"publish {rows.rounds['publish'][-1]['p50']:.2f} us, "
            f"encode {rows.rounds['encode only'][-1]['p50']:.2f} us, "
            f"build + publish {rows.rounds['build + publish'][-1]['p50']:.2f} us",
            flush=True,
        )
    spool_after = producer.spool.count()
    return spool_present, spool_before, spool_after, producer.stats.spooled, producer.stats.delivery_failures


def run(count: int, rounds: int) -> tuple[dict[str, Any], str]:
    """Measure every row; return the JSON payload and the markdown report."""
    print(f"building {count:,} ops and their encodings...", flush=True)
    work = Workload.build(count)
    sizes = sorted(len(value) for _, value in work.pairs)
    topic = f"bench-publish-{uuid.uuid4().hex[:8]}"
    rows = Rows()
    with embedded_kafka() as broker, tempfile.TemporaryDirectory(prefix="crr-bench-") as workdir:
        spool_path = os.path.join(workdir, "spool.sqlite3")
        settings = Settings.from_mapping(
            {
                "redis_retry_kafka": {"bootstrap.servers": broker.bootstrap_servers},
                "redis_retry_targets": {"default": "redis://127.0.0.1:1/0"},  # never contacted
                "redis_retry_topic": topic,
                "redis_retry_spool_path": spool_path,
            }
        )
        producer = RetryProducer(settings, handle_sigterm=False)
        raw = kafka.new_producer(settings.kafka, **{"delivery.report.only.error": True})
        print(f"broker {broker.bootstrap_servers} (pid {broker.pid}); topic {topic}; spool {spool_path}", flush=True)

        try:
            spool_present, spool_before, spool_after, spooled, failures = _rounds(rows, rounds, producer, raw, work)
        finally:
            producer.close(timeout=FLUSH_TIMEOUT)
            raw.flush(FLUSH_TIMEOUT)

    overhead = timer_overhead_us(100_000)
    raw_row, pub_row, enc_row, built_row = (
        rows.median_round(r) for r in ("raw produce", "publish", "encode only", "build + publish")
    )
    ratio = pub_row["p50"] / raw_row["p50"]
    diff = pub_row["p50"] - raw_row["p50"]
    # Rounds run back to back, so a paired difference cancels slow machine noise.
    paired = statistics.median(
        p["p50"] - r["p50"] for p, r in zip(rows.rounds["publish"], rows.rounds["raw produce"], strict=True)
    )
    goal_ratio = ratio <= GOAL_OVER_RAW_RATIO
    goal_built = built_row["p50"] <= GOAL_BUILD_PUBLISH_P50_US
    spool_note = (
        f"spool file present ({spool_present}), {spool_before} messages before the rounds and {spool_after} after; "
        f"{spooled} ops spooled and {failures} delivery failures during the run"
    )
    info = machine()

    headers = ["row", "p50 us", "p90 us", "p99 us", "max us", "mean us", "handoff ops/s", "delivered ops/s",
               "p50 range over rounds"]
    table_rows = [
        [label, r["p50"], r["p90"], r["p99"], r["max"], r["mean"], round(r["throughput_ops_s"]),
         round(r["delivered_ops_s"]) if "delivered_ops_s" in r else "-", rows.p50_range(row)]
        for label, row, r in (
            ("raw produce", "raw produce", raw_row), ("publish (spool idle)", "publish", pub_row),
            ("encode only", "encode only", enc_row), ("build + publish", "build + publish", built_row),
        )
    ]
    per_round = markdown_table(
        ["round", *(f"{row} p50 us" for row in rows.rounds)],
        [[i + 1, *(rows.rounds[row][i]["p50"] for row in rows.rounds)] for i in range(rounds)],
    )
    lines = [
        f"# {NAME}: RetryProducer.publish vs raw Producer.produce",
        "",
        f"{count:,} ops per round, {rounds} alternating rounds per row, median round shown. "
        f"Messages {sizes[0]}-{sizes[-1]} bytes (median {sizes[len(sizes) // 2]}), one key per op, 4 partitions, "
        "embedded Kafka in its own process.",
        "",
        markdown_table(headers, table_rows),
        "",
        f"- publish / raw p50: **{ratio:.2f}x**; publish - raw p50: **{diff:+.2f} us** (median of the per-round "
        f"differences: {paired:+.2f} us)",
        f"- goal publish p50 <= {GOAL_OVER_RAW_RATIO:g}x raw p50: **{'met' if goal_ratio else 'MISSED'}** "
        f"({ratio:.2f}x)",
        f"- goal build + publish p50 <= {GOAL_BUILD_PUBLISH_P50_US:g} us: **{'met' if goal_built else 'MISSED'}** "
        f"({built_row['p50']:.2f} us: ops.set(..., ex=...).with_source(...).with_context(trace_id=...), "
        "then published)",
        f"- every sample includes ~{overhead:.3f} us of clock reads (perf_counter_ns twice)",
        f"- {spool_note}",
        "- handoff ops/s: calls per second of the timed loop; delivered ops/s: including the flush until Kafka "
        "acknowledged every message",
        "",
        "Per-round p50:",
        "",
        per_round,
        "",
        f"Machine: {describe_machine(info)}",
    ]
    if spooled or failures or spool_after or any(r["buffer_full"] for rs in rows.rounds.values() for r in rs):
        lines.insert(4, "**WARNING: ops were spooled, failed or hit a full queue: the rows are not comparable.**\n")
    payload = {
        "ops": count,
        "rounds": rounds,
        "message_bytes": {"min": sizes[0], "median": sizes[len(sizes) // 2], "max": sizes[-1]},
        # The logger and the callbacks (stats_cb) are objects, not settings a reader compares.
        "librdkafka_settings": {k: v for k, v in kafka.producer_config(settings.kafka).items()
                                if k != "logger" and not callable(v)} | {"delivery.report.only.error": True},
        "median_round": {"raw produce": raw_row, "publish": pub_row, "encode only": enc_row,
                         "build + publish": built_row},
        "all_rounds": rows.rounds,
        "publish_over_raw_ratio_p50": ratio,
        "publish_minus_raw_p50_us": diff,
        "publish_minus_raw_p50_us_paired_median": paired,
        "goals": {
            f"publish_p50_le_{GOAL_OVER_RAW_RATIO:g}x_raw": goal_ratio,
            f"build_publish_p50_le_{GOAL_BUILD_PUBLISH_P50_US:g}us": goal_built,
        },
        "summary": [
            {"what": "RetryProducer.publish latency p50", "unit": "us", "project": pub_row["p50"],
             "raw": raw_row["p50"], "raw_what": "confluent-kafka produce()", "ratio": ratio,
             "goal": f"<= {GOAL_OVER_RAW_RATIO:g}x raw", "met": goal_ratio},
            {"what": "op built with context + publish latency p50", "unit": "us", "project": built_row["p50"],
             "raw": raw_row["p50"], "raw_what": "confluent-kafka produce()", "ratio": built_row["p50"] / raw_row["p50"],
             "goal": f"<= {GOAL_BUILD_PUBLISH_P50_US:g} us", "met": goal_built},
        ],
        "timer_overhead_us": overhead,
        "spool": {"present": spool_present, "before": spool_before, "after": spool_after, "spooled": spooled,
                  "delivery_failures": failures},
        "machine": info,
    }
    return payload, "\n".join(lines)


# -- profile ------------------------------------------------------------------------------


def _stage_costs(
    settings: Settings, fields: Sequence[Fields], producer: RetryProducer, raw: kafka.Producer, topic: str
) -> list[list[Any]]:
    """Mean ns per op of each step of ``publish``, each timed over the whole list (best of several).

    The loops keep no results: retaining 100,000 dicts would make the cyclic GC walk
    them again and again, a cost ``publish`` itself never pays.
    """
    signer = settings.signer
    items = [
        ops.set(key, value, ex=3600).with_source(SOURCE).with_context(trace_id=trace) for key, value, trace in fields
    ]
    documents = [message.op_document(op) for op in items]
    encoded = [(message.message_key(op), message.encode(op)) for op in items]
    check, document, dumps, encode, key_of, produce = (
        settings.check_op, message.op_document, message.dumps, message.encode, message.message_key, raw.produce
    )

    def empty() -> None:
        for _ in items:
            pass

    def checks() -> None:
        for op in items:
            check(op)

    def documents_only() -> None:
        for op in items:
            document(op)

    def dumps_only() -> None:
        for doc in documents:
            dumps(doc)

    def encodes() -> None:
        for op in items:
            encode(op, signer)

    def keys() -> None:
        for op in items:
            key_of(op)

    def produces() -> None:
        for key, value in encoded:
            produce(topic, value, key)

    def publishes() -> None:
        publish = producer.publish
        for op in items:
            publish(op)

    def sets() -> None:
        set_ = ops.set
        for key, value, _ in fields:
            set_(key, value, ex=3600)

    def builds() -> None:
        set_ = ops.set
        for key, value, trace in fields:
            set_(key, value, ex=3600).with_source(SOURCE).with_context(trace_id=trace)

    def builds_and_publishes() -> None:
        publish, set_ = producer.publish, ops.set
        for key, value, trace in fields:
            publish(set_(key, value, ex=3600).with_source(SOURCE).with_context(trace_id=trace))

    stages: list[tuple[str, Callable[[], None]]] = [
        ("empty loop", empty),
        ("settings.check_op", checks),
        ("message.op_document", documents_only),
        ("message.dumps (orjson)", dumps_only),
        ("message.encode", encodes),
        ("message.message_key", keys),
        ("Producer.produce (pre-encoded, raw producer)", produces),
        ("RetryProducer.publish (all of it)", publishes),
        ("ops.set(k, v, ex=...)", sets),
        ("ops.set(k, v, ex=...).with_source(...).with_context(trace_id=...)", builds),
        ("build + publish", builds_and_publishes),
    ]

    def settle() -> None:
        raw.flush(FLUSH_TIMEOUT)
        producer.flush(FLUSH_TIMEOUT)

    # Interleaved repetitions, best of each: this machine's speed drifts for seconds at a
    # time, and a stage timed only in a slow phase would look expensive.
    best = dict.fromkeys((name for name, _ in stages), float("inf"))
    for _ in range(STAGE_REPEATS):
        for name, stage in stages:
            best[name] = min(best[name], _timed_once(stage, settle))
    costs = {name: elapsed / len(items) for name, elapsed in best.items()}
    loop = costs["empty loop"]
    parts = ("settings.check_op", "message.encode", "message.message_key",
             "Producer.produce (pre-encoded, raw producer)")
    rest = costs["RetryProducer.publish (all of it)"] - sum(costs[p] - loop for p in parts) - loop
    rows: list[list[Any]] = [[name, cost, cost - loop] for name, cost in costs.items()]
    rows.append(["publish minus the parts above (its own code, produce() kwargs, callbacks config)", rest, rest])
    return rows


def _timed_once(stage: Callable[[], None], settle: Callable[[], object]) -> int:
    gc.collect()
    start = time.perf_counter_ns()
    stage()
    elapsed = time.perf_counter_ns() - start
    settle()  # the produce stages queued a round: deliver it before the next
    return elapsed


def profile(count: int) -> int:
    """Building and publishing ops under pyinstrument, then a per-stage breakdown; prints both."""
    from pyinstrument import Profiler

    fields = op_fields(count)
    topic = f"bench-publish-profile-{uuid.uuid4().hex[:8]}"
    with embedded_kafka() as broker, tempfile.TemporaryDirectory(prefix="crr-bench-") as workdir:
        settings = Settings.from_mapping(
            {
                "redis_retry_kafka": {"bootstrap.servers": broker.bootstrap_servers},
                "redis_retry_targets": {"default": "redis://127.0.0.1:1/0"},
                "redis_retry_topic": topic,
                "redis_retry_spool_path": os.path.join(workdir, "spool.sqlite3"),
            }
        )
        producer = RetryProducer(settings, handle_sigterm=False)
        raw = kafka.new_producer(settings.kafka, **{"delivery.report.only.error": True})
        _time_publish(producer, build_ops(WARMUP))
        producer.flush(FLUSH_TIMEOUT)
        profiler = Profiler(interval=0.0001, async_mode="disabled")
        publish, set_ = producer.publish, ops.set
        profiler.start()
        for key, value, trace in fields:
            publish(set_(key, value, ex=3600).with_source(SOURCE).with_context(trace_id=trace))
        profiler.stop()
        producer.flush(FLUSH_TIMEOUT)
        stages = _stage_costs(settings, fields, producer, raw, topic)
        producer.close()
        raw.flush(FLUSH_TIMEOUT)
    print(profiler.output_text(unicode=True, color=False, show_all=True, timeline=False))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    html = RESULTS_DIR / f"{NAME}.profile.html"
    html.write_text(profiler.output_html())
    print(markdown_table(["stage", "mean ns/op", "minus empty loop"], stages))
    print(f"\nHTML profile: {html}")
    return 0


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_publish", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", type=int, default=100_000, help="ops per round (default 100,000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per row (default 5)")
    parser.add_argument("--json", metavar="PATH", help=f"results file (default {RESULTS_DIR}/{NAME}.json; .md beside)")
    parser.add_argument("--profile", action="store_true", help="profile the publish path with pyinstrument instead")
    args = parser.parse_args(list(argv))
    if args.ops < 1 or args.rounds < 1:
        parser.error("--ops and --rounds must be >= 1")
    if args.profile:
        return profile(args.ops)
    payload, markdown = run(args.ops, args.rounds)
    publish_results(NAME, payload, markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
