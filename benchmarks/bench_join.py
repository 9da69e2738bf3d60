"""Benchmark: how long a bridge takes from launch to its first op handed over, on real Apache Kafka.

A 3-broker Apache Kafka cluster (:class:`~celery_redis_retry.testing.ApacheKafka`, KRaft,
replication factor 3) holds one op in the retry topic. For each consumer-group setting,
``celery -A bench_app redis-retry bridge`` is launched as a subprocess with a fresh group
and timed from launch until its first task lands in the Celery queue (``LLEN`` on a Redis
broker; no worker runs, so the op never ends and is not committed). Then the same bridge
is restarted twice, each time with the queue emptied first and timed the same way: after
a graceful stop (SIGTERM), and after a crash (SIGKILL), when the group still counts the
dead member until its session times out.

Settings (``redis_retry_kafka``, on top of the package's consumer defaults):

* ``classic``: the classic protocol (``cooperative-sticky``, the default);
* ``classic, static (--name)``: the same, the bridge started with ``--name``: a static
  member (``group.instance.id`` ``<host>.<name>``);
* ``consumer``: KIP-848 (``group.protocol=consumer``);
* ``consumer, static``: KIP-848 with ``group.instance.id`` set in ``redis_retry_kafka``
  (``--name`` sets none with KIP-848).

The cluster's own settings are those of the test harness, notably
``group.initial.rebalance.delay.ms=0`` (the broker's default, 3 s, delays every first
join of a classic group) and, for KIP-848, a 10 s member session timeout (the broker's
default is 45 s). Each column is the median of ``--rounds`` rounds; the "launch to
consuming" column (launch until the bridge logs that it consumes) is the part that is
Python, Celery and the start checks, not the group.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery_redis_retry import kafka, message
from celery_redis_retry.testing import ApacheKafka, CeleryCommand

from .bench_publish import build_ops
from .machine import code_under_test, describe_code, describe_machine, machine
from .output import markdown_table, write_results
from .stack import bench_env, redis_server

NAME = "bench_join"
#: How long one start may take before the round fails (a crash restart waits for the session timeout).
START_TIMEOUT = 60.0
POLL_INTERVAL = 0.01
#: The log line of a bridge whose start checks passed and whose consumers subscribed.
CONSUMING = "bridge consuming"


@dataclass(frozen=True)
class Setting:
    label: str
    kafka: Mapping[str, Any]
    #: Arguments of ``redis-retry bridge``.
    args: tuple[str, ...] = ()


SETTINGS = (
    Setting("classic", {}),
    Setting("classic, static (--name)", {}, ("--name", "bench-join")),
    Setting("consumer", {"group.protocol": "consumer"}),
    Setting("consumer, static", {"group.protocol": "consumer", "group.instance.id": "bench-join-bridge"}),
)

#: The three starts of one round, in the order they happen.
STARTS = ("first start", "restart after SIGTERM", "restart after SIGKILL")


@dataclass
class Stack:
    """The cluster with the one-op topic, the Redis broker, a work folder."""

    cluster: ApacheKafka
    topic: str
    redis_url: str
    workdir: Path

    def env(self, setting: Setting, group: str, queue: str) -> dict[str, str]:
        import json

        env = bench_env(
            broker_url=self.redis_url, bootstrap=self.cluster.bootstrap_servers,
            target_url=self.redis_url.rsplit("/", 1)[0] + "/1", topic=self.topic, group=group, queue=queue,
            spool=str(self.workdir / f"spool-{queue}.sqlite3"), batch_size=None, high_water=0,
        )
        # The package's consumer defaults plus the setting measured, not the tests' fast-join ones.
        env["CRR_BENCH_KAFKA_EXTRA"] = json.dumps(dict(setting.kafka))
        return env


def prepare(cluster: ApacheKafka, redis_url: str, workdir: Path) -> Stack:
    """Create the retry, DLQ, ends and waiting topics and write one op to each partition of the retry topic."""
    topic = f"bench-join-{uuid.uuid4().hex[:8]}"
    for name in (topic, f"{topic}.dlq", f"{topic}.ends", f"{topic}.waiting.default"):
        cluster.create_topic(name, partitions=4)
    producer = kafka.new_producer(cluster.config)
    for partition, op in enumerate(build_ops(4)):
        producer.produce(topic, message.encode(op), partition=partition)
    if producer.flush(30):
        raise SystemExit("the ops were not written to the cluster")
    return Stack(cluster, topic, redis_url, workdir)


class StartFailed(Exception):
    """A bridge that exited, or handed nothing over within :data:`START_TIMEOUT`."""


def _timed_start(bridge: CeleryCommand, queued: Callable[[], int]) -> dict[str, float]:
    """Launch ``bridge``; seconds until it logs that it consumes and until its first task is queued."""
    mark = bridge.mark() if bridge.log_path.exists() else 0
    start = time.monotonic()
    bridge.start()
    consuming: float | None = None
    while time.monotonic() - start < START_TIMEOUT:
        if consuming is None and CONSUMING in bridge.log_text(since=mark):
            consuming = time.monotonic() - start
        if queued() > 0:
            first = time.monotonic() - start
            return {"consuming_s": consuming if consuming is not None else first, "first_op_s": first}
        if not bridge.running:
            raise StartFailed(f"the bridge exited with {bridge.returncode}")
        time.sleep(POLL_INTERVAL)
    raise StartFailed(f"no op handed over within {START_TIMEOUT:g} s")


def _failure(bridge: CeleryCommand, mark: int, why: str) -> str:
    """``why``, with the bridge's first ERROR or CRITICAL line of the failed start."""
    problems = [line for line in bridge.log_text(since=mark).splitlines() if "CRITICAL" in line or "ERROR" in line]
    return f"{why}: {problems[0].split('] ', 1)[-1]}" if problems else why


def run_round(stack: Stack, setting: Setting, broker: Any) -> dict[str, Any]:
    """First start, restart after SIGTERM, restart after SIGKILL of one bridge in a fresh group.

    A start that fails is recorded with its reason, and the round ends there.
    """
    queue = f"bench-join-{uuid.uuid4().hex[:8]}"
    env = stack.env(setting, group=f"group-{queue}", queue=queue)
    bridge = CeleryCommand("bench_app", ["redis-retry", "bridge", *setting.args], env=env, cwd=str(stack.workdir),
                           log_dir=stack.workdir)

    def queued() -> int:
        return int(broker.llen(queue))

    timings: dict[str, Any] = {}
    try:
        for start in STARTS:
            if start == STARTS[1]:
                bridge.stop(timeout=30)
            elif start == STARTS[2]:
                bridge.kill()
            broker.delete(queue)
            mark = bridge.mark() if bridge.log_path.exists() else 0
            try:
                timings[start] = _timed_start(bridge, queued)
            except StartFailed as failed:
                timings[start] = {"failed": _failure(bridge, mark, str(failed))}
                break
    finally:
        bridge.stop(timeout=30)
    return timings


def _median(rounds: list[dict[str, Any]], start: str, what: str) -> float | str:
    """The median over the rounds, or "failed" when a round's start failed or never happened."""
    values = [r.get(start, {}).get(what) for r in rounds]
    return "failed" if any(v is None for v in values) else statistics.median(values)


def _cell(timings: dict[str, Any], start: str) -> float | str:
    value = timings.get(start, {}).get("first_op_s")
    return "failed" if value is None else value


def report(results: dict[str, list[dict[str, Any]]], rounds: int, version: str,
           info: dict[str, Any]) -> str:
    headers = ["setting", *(f"{s} (s)" for s in STARTS), "launch to consuming (s)"]
    rows = [
        [label, *(_median(per_round, s, "first_op_s") for s in STARTS), _median(per_round, STARTS[0], "consuming_s")]
        for label, per_round in results.items()
    ]
    lines = [
        f"# {NAME}: launch to first op handed over, on a 3-broker Apache Kafka cluster",
        "",
        "One bridge (`celery -A bench_app redis-retry bridge`, package defaults, Redis Celery broker) in a "
        "fresh consumer group, timed from launch until its first task is in the Celery queue; then restarted "
        "after SIGTERM and after SIGKILL. Median of "
        f"{rounds} rounds (all rows from the same run). The cluster: Apache Kafka {version}, "
        "KRaft, RF 3, `group.initial.rebalance.delay.ms=0`, "
        "KIP-848 member session timeout 10 s.",
        "",
        markdown_table(headers, rows),
        "",
        "Per round (first start / after SIGTERM / after SIGKILL, s):",
        "",
        markdown_table(["setting", "round", *STARTS], [
            [label, n, *(_cell(r, s) for s in STARTS)]
            for label, per_round in results.items() for n, r in enumerate(per_round, 1)
        ]),
        *failures(results),
        "",
        f"Machine: {describe_machine(info)}",
        "",
        f"Code measured: {describe_code(code_under_test())}",
    ]
    return "\n".join(lines)


def _shown(value: float | str) -> str:
    return f"{value:.2f} s" if isinstance(value, float) else value


def failures(results: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One line per failed start: the setting, the round, the start and why."""
    lines = [
        f"- {label}, round {n}, {start}: {timings['failed']}"
        for label, per_round in results.items() for n, r in enumerate(per_round, 1)
        for start, timings in r.items() if "failed" in timings
    ]
    return ["", "Failed starts:", "", *lines] if lines else []


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_join", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per setting (default 3)")
    parser.add_argument("--brokers", type=int, default=3, help="Apache Kafka brokers (default 3)")
    parser.add_argument("--only", action="append", choices=[s.label for s in SETTINGS],
                        help="measure only this setting (repeatable)")
    parser.add_argument("--json", default=None, metavar="PATH", help="where to write the results")
    args = parser.parse_args(argv)
    settings = [s for s in SETTINGS if not args.only or s.label in args.only]
    info = machine()
    workdir = Path(tempfile.mkdtemp(prefix="crr-bench-join-"))
    cluster = ApacheKafka(args.brokers, dir=workdir / "kafka")
    print(f"starting Apache Kafka, {args.brokers} brokers...", flush=True)
    with cluster.start(), redis_server() as redis:
        stack = prepare(cluster, redis.url, workdir)
        results: dict[str, list[dict[str, Any]]] = {s.label: [] for s in settings}
        with redis.client() as broker:
            for n in range(1, args.rounds + 1):
                for setting in settings:  # interleaved: a slower minute of the machine hits every setting
                    timings = run_round(stack, setting, broker)
                    results[setting.label].append(timings)
                    print(f"round {n}, {setting.label}: " + ", ".join(
                        f"{s} {_shown(_cell(timings, s))}" for s in STARTS), flush=True)
    markdown = report(results, args.rounds, cluster.version, info)
    payload = {"rounds": args.rounds, "brokers": args.brokers, "kafka_version": cluster.version,
               "results": results, "machine": info, "code": code_under_test()}
    json_file, md_file = write_results(NAME, payload, markdown, args.json)
    print()
    print(markdown)
    print(f"\nresults: {json_file}, {md_file}")


if __name__ == "__main__":
    main()
