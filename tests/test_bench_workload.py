"""The drain benchmark's backlog, its applied-op count and its curves (``benchmarks/``)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from benchmarks import bench_drain
from benchmarks.curves import costs, plan
from benchmarks.drain_point import Point, check_fits
from benchmarks.workload import AppliedTracker, Backlog, non_idempotent_mix, parse_mix, raw_pipelined, seed
from celery_redis_retry.testing import RedisServer


def test_parse_mix_gives_equal_or_named_shares() -> None:
    assert parse_mix("set,hset,del,incrby,rpush") == dict.fromkeys(("set", "hset", "del", "incrby", "rpush"), 0.2)
    assert parse_mix("set") == {"set": 1.0}
    assert parse_mix("set=60, incrby=40") == {"set": 0.6, "incrby": 0.4}


@pytest.mark.parametrize(("text", "named"), [("set,zadd", "'zadd'"), ("set=x", "'x'"), ("set=0", "no command")])
def test_parse_mix_names_what_is_wrong(text: str, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        parse_mix(text)


def test_backlog_has_exact_shares_and_spreads_evenly_over_targets() -> None:
    backlog = Backlog(1000, non_idempotent_mix(25), targets=4)
    assert Counter(backlog.kinds) == {"set": 250, "hset": 250, "del": 250, "incrby": 125, "rpush": 125}
    per_target = Counter(backlog.target_of(n) for n in range(1000))
    assert set(per_target.values()) == {250}
    names = Counter(op.target for op in backlog.ops())
    assert names == {"default": 250, "t1": 250, "t2": 250, "t3": 250}
    assert [op.commands[0][0] for op in backlog.ops()][:20] == [k.upper() for k in backlog.kinds[:20]]


@pytest.fixture
def targets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[redis.Redis]]:
    with RedisServer(dir=str(tmp_path_factory.mktemp("bench"))).start() as one, \
            RedisServer(dir=str(tmp_path_factory.mktemp("bench"))).start() as two:
        clients = [redis.Redis.from_url(one.url), redis.Redis.from_url(two.url)]
        yield clients
        for client in clients:
            client.close()


@pytest.mark.slow
def test_tracker_counts_applied_ops_from_the_targets_keys(targets: list[redis.Redis]) -> None:
    backlog = Backlog(5000, parse_mix("set,hset,del,incrby,rpush"), targets=2)
    assert seed(targets, backlog) == 1000
    tracker = AppliedTracker(targets, backlog)
    assert tracker.count(exhaustive=True) == 0  # seeded DEL keys are still there
    commands = backlog.commands()
    half = [mine[: len(mine) // 2] for mine in commands]
    raw_pipelined(targets, half, 1000)
    polled = tracker.count()  # stops at chunks where nothing is applied yet: a lower bound
    partly = tracker.count(exhaustive=True)
    assert partly == sum(len(mine) for mine in half)
    assert 0 < polled <= partly
    assert not tracker.done
    raw_pipelined(targets, [mine[len(mine) // 2:] for mine in commands], 1000)
    assert tracker.count(exhaustive=True) == 5000
    assert tracker.done


def test_curves_plan_their_points_and_refuse_unknown_values() -> None:
    base = Point(ops=1000, mix=parse_mix("set"))
    assert [p.point.batch_size for p in plan("batch", base, None, 1)] == [1, 100, 1000, 5000]
    assert [p.point.ops for p in plan("size", base, None, 1)] == [10_000, 100_000, 1_000_000]
    safety = plan("safety", base, ["commit", "stamps"], 2)
    assert [(p.feature, p.on) for p in safety] == [("commit", True), ("commit", False)] * 2 + [
        ("stamps", True), ("stamps", False)] * 2
    assert safety[1].point.commit_after == "handover"
    assert safety[5].point.write_stamps is False
    with pytest.raises(ValueError, match="unknown safety feature 'tls'"):
        plan("safety", base, ["tls"], 1)
    with pytest.raises(ValueError, match="unknown curve"):
        plan("latency", base, None, 1)


def test_a_features_cost_compares_medians_and_checks_its_goal() -> None:
    base = Point(ops=1000, mix=parse_mix("set"))
    planned = plan("safety", base, ["commit", "signing", "durable"], 1)

    def run(ops_s: float, publish_s: float = 1.0) -> dict[str, float]:
        return {"ops_s": ops_s, "ops_s_first_to_last": ops_s, "publish_s": publish_s}

    drains = [run(850), run(1000), run(990), run(1000), run(1000, 4.0), run(1000, 1.0)]
    rows = {r["feature"]: r for r in costs(list(zip(planned, drains, strict=True)))}
    assert (rows["commit"]["cost_pct"], rows["commit"]["met"]) == (15.0, False)
    assert (rows["signing"]["cost_pct"], rows["signing"]["met"]) == (1.0, True)
    # Durable publish is judged by what it slows: publishing (4 s instead of 1).
    assert (rows["durable"]["judged"], rows["durable"]["publish_cost_pct"], rows["durable"]["met"]) == (
        "publish_cost_pct", 75.0, False)


def test_a_backlog_too_big_for_the_embedded_broker_is_refused_before_anything_starts() -> None:
    with pytest.raises(SystemExit, match="embedded broker keeps only ~5 MiB per partition"):
        check_fits("embedded", [Point(ops=100_000, mix=parse_mix("set"))])
    check_fits("tansu", [Point(ops=1_000_000, mix=parse_mix("set"))])


@pytest.mark.slow
def test_a_drain_curve_runs_end_to_end_and_names_its_broker(tmp_path: Path) -> None:
    """A real bridge and ``celery worker`` drain a 2-target backlog from the embedded broker."""
    results = tmp_path / "bench_drain-targets.json"
    status = bench_drain.main(["--kafka", "embedded", "--ops", "400", "--curve", "targets", "--points", "2",
                               "--json", str(results)])
    assert status == 0
    document = json.loads(results.read_text())
    (drain,) = document["drains"]
    assert document["kafka"] == "embedded"
    assert drain["all_applied"]
    assert drain["point"]["targets"] == 2
    assert drain["raw"]["applied"] == 400
    assert set(drain["rss"]) == {"bridge", "worker main", "worker child"}
    assert "| 2 targets | embedded |" in results.with_suffix(".md").read_text()
    assert [row["goal"] for row in document["summary"]] == ["all applied", "<= 10% after warm-up (20% applied)"]


def test_signed_messages_count_toward_the_embedded_brokers_capacity() -> None:
    backlog = Point(ops=34_000, mix=parse_mix("set"))
    check_fits("embedded", [backlog])  # ~370-byte messages fit
    with pytest.raises(SystemExit, match=r"34,000 ops of ~4\d\d bytes"):
        check_fits("embedded", [backlog.with_(signing=True)])  # a signature adds ~95 bytes


def test_the_sizing_guide_reads_cpu_per_op_from_a_default_drain() -> None:
    from benchmarks import sizing

    def samples(cpu_at_first: int, cpu_at_end: int) -> list[dict[str, float]]:
        return [{"t": 0.0, "cpu_ms": 0}, {"t": 2.0, "cpu_ms": cpu_at_first}, {"t": 7.0, "cpu_ms": cpu_at_end}]

    point = {"batch_size": None, "commit_after": "end", "write_stamps": True, "signing": False,
             "durable_publish": False, "targets": 1, "mix": dict.fromkeys(("set", "hset", "del", "incrby", "rpush"),
                                                                           0.2), "concurrency": 2}
    drain = {"point": point, "all_applied": True, "applied": 100_000, "launch_to_first_s": 1.5,
             "rss": {"bridge": {"samples": samples(400, 1_400)}, "worker main": {"samples": samples(500, 1_100)},
                     "worker child": {"samples": samples(0, 1_000)}}}
    worker = {"results": {"incrby": {"replay": [{"redis_us_per_op": 10.0}]}}}
    found = sizing.costs({"bench_drain": {"drains": [drain]}, "bench_worker-batch1000": worker})
    assert found is not None
    # 1,000 ms of bridge CPU over 100,000 ops; the sampled child is one of two.
    assert (found["bridge_us"], found["worker_main_us"], found["worker_child_us"], found["redis_us"]) == (
        10.0, 6.0, 20.0, 10.0)
    text = "\n".join(sizing.section({"bench_drain": {"drains": [drain]}, "bench_worker-batch1000": worker}))
    assert "| bridge (consume, decode, hand over, commit)" in text
    # 100,000 ops/s (x1.5) at 23 us per worker process: 4 of them; at 10 us per bridge: 2 bridges.
    assert "| 50,000" in text
    assert "|                       4 |              2 | 150%" in text
    # A drain at other settings is no basis for the guide.
    assert sizing.section({"bench_drain": {"drains": [{**drain, "point": {**point, "write_stamps": False}}]}}) == []
