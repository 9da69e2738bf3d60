"""Benchmark: what a replayed op costs the target Redis, against the bare command.

For each command of the drain's mixed workload (``SET`` with EX, ``HSET`` of 4 fields,
``DEL``, ``INCRBY``, ``RPUSH``; :func:`benchmarks.workload.build_op`), ``--ops`` ops are
run three ways against one local redis-server, from this process, in batches of 1,000:

* **raw**: their commands in redis-py pipelines;
* **replay**: the replay tasks' own path, :meth:`Executor.run_many` (one ``apply_batch.lua``
  call per 200 ops: dedupe marker for non-idempotent ops, write stamps read and raised);
* **floor**: a Lua loop that makes only the calls a replay cannot do without (for each op:
  ``SET NX PX`` of its marker when it needs one, ``HMGET`` of its stamps, the command,
  ``HSET`` of its stamps, ``PEXPIRE``), from the same MessagePack argument, 200 ops a call.
  It decides nothing; it is the least a step that keeps the marker and the stamps can cost.

Each is timed on the wall clock (ops/s) and on the target (``INFO commandstats``: the
script calls' time, which includes the commands they run, or the bare commands' time).
Each figure is the median of ``--rounds`` interleaved rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import msgpack
import redis

from celery_redis_retry.config import Settings
from celery_redis_retry.ops import RedisOp
from celery_redis_retry.replay.executor import Executor
from celery_redis_retry.replay.outcomes import ReplayResult

from .machine import code_under_test, describe_code, describe_machine, machine
from .output import markdown_table, write_results
from .stack import redis_server
from .workload import KINDS, build_op

NAME = "bench_replay_step"
BATCH = 1000
STEP = 200
#: Commands that are not the work measured (the benchmark's own resets and reads).
_ADMIN = ("cmdstat_info", "cmdstat_config|resetstat", "cmdstat_flushall", "cmdstat_script|load", "cmdstat_ping",
          "cmdstat_hello", "cmdstat_client|setinfo", "cmdstat_client|setname")

FLOOR_SCRIPT = """
for _, op in ipairs(cmsgpack.unpack(ARGV[1])) do
  local keys, command = op[1], op[2]
  if keys[1] ~= '' then redis.call('SET', keys[1], '1', 'NX', 'PX', 600000) end
  redis.call('HMGET', keys[2], '=', '+')
  redis.call(unpack(command))
  redis.call('HSET', keys[2], '+', '1796412427144760')
  redis.call('PEXPIRE', keys[2], 600000)
end
return 1
"""


def _server_usec(client: redis.Redis, scripted: bool) -> float:
    """The target's time in the measured commands; for script calls, theirs alone (the
    commands a script runs are counted in its time and again under their own names)."""
    stats: dict[str, dict[str, Any]] = client.info("commandstats")
    if scripted:
        return float(stats.get("cmdstat_evalsha", {}).get("usec", 0))
    return float(sum(v["usec"] for k, v in stats.items() if k not in _ADMIN))


def _prepared(client: redis.Redis, kind: str, ops: list[RedisOp]) -> None:
    client.flushall()
    if kind == "del":  # something to delete
        pipe = client.pipeline(transaction=False)
        for op in ops:
            pipe.set(str(op.first_key), "to be deleted")
        pipe.execute()
    client.config_resetstat()


def _raw(client: redis.Redis, ops: list[RedisOp]) -> None:
    for first in range(0, len(ops), BATCH):
        pipe = client.pipeline(transaction=False)
        for op in ops[first:first + BATCH]:
            pipe.execute_command(*op.commands[0])
        pipe.execute()


def _replay(executor: Executor) -> Callable[[redis.Redis, list[RedisOp]], None]:
    def run(_client: redis.Redis, ops: list[RedisOp]) -> None:
        for first in range(0, len(ops), BATCH):
            for result in executor.run_many(ops[first:first + BATCH]):
                if not isinstance(result, ReplayResult) or result.outcome != "applied":
                    raise RuntimeError(f"a replay did not apply: {result!r}")
    return run


def _floor(sha: str, marked: bool) -> Callable[[redis.Redis, list[RedisOp]], None]:
    def run(client: redis.Redis, ops: list[RedisOp]) -> None:
        for first in range(0, len(ops), BATCH):
            batch = ops[first:first + BATCH]
            steps = [
                msgpack.packb([[[f"crr:{{{op.first_key}}}:applied:{op.id}" if marked else "",
                                 f"crr:{{{op.first_key}}}:w"], [str(x) for x in op.commands[0]]]
                               for op in batch[at:at + STEP]], use_bin_type=False)
                for at in range(0, len(batch), STEP)
            ]
            pipe = client.pipeline(transaction=False)
            for step in steps:
                pipe.evalsha(sha, 0, step)
            pipe.execute()
    return run


def measure(client: redis.Redis, kind: str, ops: list[RedisOp], how: Callable[[redis.Redis, list[RedisOp]], None],
            *, scripted: bool) -> dict[str, float]:
    _prepared(client, kind, ops)
    began = time.perf_counter()
    how(client, ops)
    wall = time.perf_counter() - began
    return {"ops_per_s": len(ops) / wall, "server_us_per_op": _server_usec(client, scripted) / len(ops)}


def run(count: int, rounds: int) -> dict[str, dict[str, dict[str, float]]]:
    """Per command and way (raw, replay, floor): the median figures of ``rounds`` rounds."""
    samples: dict[str, dict[str, list[dict[str, float]]]] = {k: {"raw": [], "replay": [], "floor": []} for k in KINDS}
    with redis_server() as server, server.client() as client:
        settings = Settings.from_mapping({"redis_retry_kafka": {"bootstrap.servers": "127.0.0.1:1"},
                                          "redis_retry_targets": {"default": server.url}})
        executor = Executor(settings)
        sha = client.script_load(FLOOR_SCRIPT)
        for n in range(1, rounds + 1):
            for kind in KINDS:  # interleaved: a slower minute of the machine hits every way
                ops = [build_op(kind, i) for i in range(count)]
                marked = kind in ("incrby", "rpush")
                ways = {"raw": _raw, "replay": _replay(executor), "floor": _floor(sha, marked)}
                for way, how in ways.items():
                    samples[kind][way].append(measure(client, kind, ops, how, scripted=way != "raw"))
                print(f"round {n}, {kind}: " + ", ".join(
                    f"{w} {s[-1]['ops_per_s']:,.0f} ops/s {s[-1]['server_us_per_op']:.2f} us"
                    for w, s in samples[kind].items()), flush=True)
    return {kind: {way: {m: statistics.median(s[m] for s in runs) for m in runs[0]} for way, runs in ways.items()}
            for kind, ways in samples.items()}


def report(results: dict[str, dict[str, dict[str, float]]], count: int, rounds: int, info: dict[str, Any]) -> str:
    rows = []
    for kind, ways in results.items():
        raw, replay, floor = ways["raw"], ways["replay"], ways["floor"]
        rows.append([kind, raw["server_us_per_op"], floor["server_us_per_op"], replay["server_us_per_op"],
                     round(raw["ops_per_s"]), round(floor["ops_per_s"]), round(replay["ops_per_s"]),
                     f"{replay['ops_per_s'] / raw['ops_per_s']:.2f}x"])
    return "\n".join([
        "# bench_replay_step: a replayed op's cost on the target",
        "",
        f"Machine: {describe_machine(info)}. {describe_code(code_under_test())}",
        "",
        f"{count:,} ops per command, batches of {BATCH:,}, one process and one local redis-server; "
        f"median of {rounds} rounds. Target µs/op: `INFO commandstats` time per op (script calls "
        "include the commands they run). The floor makes only the calls a replay keeps (marker for "
        "INCRBY and RPUSH, stamps read, command, stamps raised, TTL) and decides nothing.",
        "",
        markdown_table(["command", "raw: target us/op", "floor: target us/op", "replay: target us/op",
                        "raw ops/s", "floor ops/s", "replay ops/s", "replay / raw"], rows),
    ])


def summary(results: dict[str, dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    entries = []
    for kind, ways in results.items():
        raw, replay = ways["raw"], ways["replay"]
        entries.append({
            "what": f"replay step, target time per {kind.upper()} op", "unit": "us",
            "project": replay["server_us_per_op"], "raw": raw["server_us_per_op"],
            "raw_what": "redis-py pipeline, same commands",
            "ratio": replay["server_us_per_op"] / raw["server_us_per_op"], "goal": None, "met": None,
        })
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_replay_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", type=int, default=20_000, help="ops per command (default 20000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--json", default=None, metavar="PATH", help="where to write the results")
    args = parser.parse_args(argv)
    info = machine()
    results = run(args.ops, args.rounds)
    markdown = report(results, args.ops, args.rounds, info)
    payload = {"ops": args.ops, "rounds": args.rounds, "results": results, "summary": summary(results),
               "machine": info, "code": code_under_test()}
    json_file, md_file = write_results(NAME, payload, markdown, args.json)
    print()
    print(markdown)
    print(f"\nresults: {json_file}, {md_file}")
    return 0


if __name__ == "__main__":
    main()
