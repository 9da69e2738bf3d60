"""Benchmark: draining a backlog end to end (Kafka -> bridge -> Celery -> Redis) against raw redis-py.

Each drain publishes ``--ops`` ops with RetryProducer to new topics, then one bridge
(``celery -A bench_app redis-retry bridge``) and one worker (``celery -A bench_app worker -P
prefork -c 2``, Redis as the Celery broker) start together, and the benchmark polls the
targets until every op is applied, sampling VmRSS / CPU of the bridge, the worker's main
process and one pool child every second. The raw row sends the very same commands with
redis-py pipelines of 1,000 from one process into the same (flushed) targets.

``--mix``: the commands of the backlog, each op writing a key of its own. The default is
SET, HSET, DEL, INCRBY and RPUSH in equal shares; ``--mix set`` is the SET-only backlog;
``--mix set=60,incrby=40`` gives shares.

``--kafka``: ``tansu`` (default), ``apache`` (a 3-broker Apache Kafka cluster, topics of
replication factor 3 and min.insync.replicas 2) or ``embedded``. The embedded broker keeps
only ~5 MiB per partition and silently drops older data, so backlogs that do not fit it are
refused.

Without ``--curve``: each ``--batch-size`` with each ``--commit-after`` mode (default both,
alternating ``--repeat`` times). With ``--curve NAME`` one sweep, each point a full drain:
``size`` (10k, 100k, 1M ops), ``batch`` (redis_retry_batch_size 1, 100, 1000, 5000),
``targets`` (1, 2, 4 redis-servers), ``non-idempotent`` (0, 25, 50, 100% of INCRBY/RPUSH),
``safety`` (write stamps, commit after end, signing, durable publish, each ON and OFF,
alternating). ``--points`` replaces a curve's values, e.g. ``--curve size --points 2000,5000``.
Results: ``benchmarks/results/bench_drain.json`` or ``bench_drain-<curve>.json`` (.md beside).

Goals: every op applied; bridge, worker and pool child RSS flat within 10% after the first op
applied; committing after end costs at most 10% of the throughput of committing at hand-over.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from .curves import CURVES, Planned, default_plan, plan
from .drain_point import Point, check_fits, run_point, servers
from .drain_report import build
from .output import RESULTS_DIR, publish_results
from .stack import KAFKA_KINDS
from .workload import describe_mix, parse_mix

NAME = "bench_drain"


def batch_sizes(text: str) -> list[int | None]:
    """``"1,100,default"`` -> ``[1, 100, None]`` (None: the package's default)."""
    out: list[int | None] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        out.append(None if part == "default" else int(part))
    if not out or any(v is not None and v < 1 for v in out):
        raise ValueError(text)
    return out


def run(args: argparse.Namespace, planned: list[Planned]) -> list[tuple[Planned, dict[str, Any]]]:
    """Every planned drain, in order, on one set of servers."""
    runs = []
    with servers(args.kafka, max(p.point.targets for p in planned)) as started:
        for number, drain in enumerate(planned, 1):
            print(f"[{number}/{len(planned)}] {drain.label}: {drain.point.ops:,} ops of "
                  f"{describe_mix(drain.point.mix)} on {args.kafka} Kafka...", flush=True)
            result = run_point(started, drain.point, args.timeout)
            print(f"drained {result['applied']:,} of {drain.point.ops:,} in {result['launch_to_done_s']:.1f} s "
                  f"({result['ops_s']:,.0f} ops/s from launch; raw {result['raw']['ops_s']:,.0f} ops/s; "
                  f"RSS flat: {result['flat']})", flush=True)
            runs.append((drain, result))
    return runs


def _plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[Point, list[Planned]]:
    """The settings every drain starts from, and the drains."""
    try:
        base = Point(ops=args.ops, mix=parse_mix(args.mix), batch_linger_ms=args.batch_linger_ms,
                     concurrency=args.concurrency, loglevel=args.loglevel, kafka_extra=args.kafka_extra)
        if args.curve:
            values = [v.strip() for v in args.points.split(",") if v.strip()] if args.points else None
            return base, plan(args.curve, base, values, args.repeat)
        return base, default_plan(base, batch_sizes(args.batch_size), args.commit_after, args.repeat)
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_drain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", type=int, default=100_000, help="backlog size (default 100,000)")
    parser.add_argument("--mix", default=",".join(("set", "hset", "del", "incrby", "rpush")),
                        help="commands of the backlog: 'set', 'set,incrby' (equal shares) or 'set=60,incrby=40' "
                             "(default: SET, HSET, DEL, INCRBY, RPUSH, 20%% each)")
    parser.add_argument("--kafka", choices=KAFKA_KINDS, default="tansu",
                        help="Kafka broker (default tansu; apache: 3 brokers, RF 3; embedded keeps only ~5 MiB per "
                             "partition)")
    parser.add_argument("--curve", choices=tuple(CURVES),
                        help="one sweep, each point a full drain: " + "; ".join(
                            f"{name}: {curve.help}".replace("%", "%%") for name, curve in CURVES.items()))
    parser.add_argument("--points", help="a curve's values instead of its own, comma-separated (e.g. "
                                         "'2000,5000' for size, 'stamps,commit' for safety)")
    parser.add_argument("--batch-size", default="default",
                        help="without --curve: redis_retry_batch_size, or several to compare: '1,100,default' "
                             "(default: the package's default)")
    parser.add_argument("--kafka-extra", type=json.loads, default={},
                        help="JSON of librdkafka settings added for the bridge, e.g. "
                             "'{\"queued.max.messages.kbytes\": 8192}'")
    parser.add_argument("--batch-linger-ms", type=int, default=None, help="redis_retry_batch_linger_ms")
    parser.add_argument("--commit-after", type=lambda text: text.split(","), default=["end", "handover"],
                        help="without --curve: redis_retry_commit_after values, comma-separated (default "
                             "end,handover)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each point (each ON/OFF pair, each commit mode) this many times, alternating "
                             "(default 1); costs compare medians")
    parser.add_argument("--concurrency", type=int, default=2, help="worker -c (default 2)")
    parser.add_argument("--loglevel", default="INFO", help="worker -l (default INFO)")
    parser.add_argument("--timeout", type=float, default=1800, help="give up a drain after seconds (default 1800)")
    parser.add_argument("--json", metavar="PATH",
                        help=f"results file (default {RESULTS_DIR}/{NAME}[-<curve>].json; .md beside)")
    args = parser.parse_args(list(argv))
    if args.ops < 100 or args.concurrency < 1 or args.repeat < 1:
        parser.error("--ops >= 100, --concurrency >= 1, --repeat >= 1")
    if not set(args.commit_after) <= {"end", "handover"}:
        parser.error(f"--commit-after: 'end' and/or 'handover', comma-separated, not {','.join(args.commit_after)!r}")
    base, planned = _plan(args, parser)
    if any(p.point.ops < 100 for p in planned):
        parser.error("every backlog needs >= 100 ops")
    check_fits(args.kafka, (p.point for p in planned))
    runs = run(args, planned)
    name = f"{NAME}-{args.curve}" if args.curve else NAME
    title = CURVES[args.curve].title if args.curve else "batch size and commit mode"
    payload, markdown = build(name, title, args.kafka, base, runs=runs, extra={
        "curve": args.curve, "ops": args.ops, "mix": parse_mix(args.mix), "repeat": args.repeat,
        "kafka_extra": args.kafka_extra, "batch_linger_ms": args.batch_linger_ms, "concurrency": args.concurrency,
        "loglevel": args.loglevel})
    publish_results(name, payload, markdown, args.json)
    return 0 if all(r["all_applied"] for _, r in runs) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
