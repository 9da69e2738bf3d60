"""Benchmark: writes through ``celery_redis_retry.wrap(client)`` against plain redis-py.

A wrapped client sends every write (SET, HSET, DEL, INCRBY...) as one ``EVALSHA`` of the
package's write script (``write_stamped.lua``), which
applies the command and records its write stamp in a hash
``crr:{<key>}:w`` beside the key; non-idempotent writes (INCRBY) also set a dedupe marker
``crr:{<key>}:applied:<op id>`` that the client unlinks in batches of 256 once the reply
arrived. That is what every write pays even while Redis is healthy, and what this
measures, on one redis-server started for the run (``RedisServer``, no persistence, TCP on
127.0.0.1, ``socket_timeout=5``, one connection per client). Three clients do the same
work on that server:

* ``plain``: redis-py's ``redis.Redis``;
* ``wrap()``: ``wrap(redis.Redis(...), producer=...)`` with the default settings (stamps on);
* ``wrap() stamps off``: the same with ``redis_retry_write_stamps=False`` (SET, HSET, DEL
  then go out as they are; INCRBY still runs the script for its dedupe marker).

The producer is a stand-in with only ``.settings``: it is consulted for the settings, and
would only publish if a write failed, which none does here.

1. Latency: each call timed on its own with ``time.perf_counter_ns`` after a warm-up, for
   ``SET k v``, ``SET k v EX 300``, ``HSET h f v``, ``DEL k`` (of keys created beforehand,
   untimed) and ``INCRBY k 1``, every call on a distinct key (values: 32 bytes). The three
   clients take turns in chunks of 100 calls, the first of each chunk rotating, so that
   machine noise lasting more than a few milliseconds hits all three alike; the database is
   flushed between commands. Percentiles are of every sample of every round; the per-round
   ratios show the spread.
2. Where the time goes: the p50 of the very EVALSHA a wrapped client sends, built up front
   and sent by the plain client (the script and the longer request without the wrapper's
   Python), interleaved with plain and wrapped calls; the Python time of building the
   script's KEYS/ARGV (``stamped_write``); Redis' own time per call (``INFO commandstats``
   of what each client sent, the batched UNLINKs of markers included).
3. Memory per written key: ``INFO memory`` ``used_memory`` after ``--keys`` distinct writes
   minus before (database flushed first) divided by ``--keys``, with ``MEMORY USAGE`` of one
   data key, one stamp key and one marker key. Markers still waiting for their batched
   UNLINK are counted, then unlinked for the steady-state figure.

Goal: SET through ``wrap()`` p50 <= 1.3x plain redis-py's.
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from celery_redis_retry.capture.wrap import wrap
from celery_redis_retry.config import Settings
from celery_redis_retry.testing import RedisServer, redis_server_binary

from .machine import code_under_test, describe_code, describe_machine, machine
from .output import RESULTS_DIR, markdown_table, publish_results
from .timing import percentiles, timer_overhead_us

NAME = "bench_wrap"
GOAL_SET_RATIO = 1.3
WARMUP = 2_000
CHUNK = 100
BREAKDOWN_CALLS = 3_000
VALUE = b"v" * 32
SOCKET_TIMEOUT = 5.0

VARIANTS = ("plain", "wrap()", "wrap() stamps off")

Call = Callable[[Any, bytes], Any]


@dataclass(frozen=True)
class Command:
    """One timed command: its label, the call, whether its keys must exist first."""

    label: str
    slug: str
    name: str  # what Redis' commandstats call it when sent as it is
    call: Call
    args: Callable[[bytes], tuple[Any, ...]]  # the execute_command arguments the call sends
    needs_keys: bool = False


COMMANDS = (
    Command("SET k v", "set", "set", lambda c, k: c.set(k, VALUE), lambda k: ("SET", k, VALUE)),
    Command("SET k v EX 300", "setex", "set", lambda c, k: c.set(k, VALUE, ex=300),
            lambda k: ("SET", k, VALUE, "EX", 300)),
    Command("HSET h f v", "hset", "hset", lambda c, k: c.hset(k, "f", VALUE), lambda k: ("HSET", k, "f", VALUE)),
    Command("DEL k", "del", "del", lambda c, k: c.delete(k), lambda k: ("DEL", k), needs_keys=True),
    Command("INCRBY k 1", "incrby", "incrby", lambda c, k: c.incrby(k, 1), lambda k: ("INCRBY", k, 1)),
)


@dataclass(frozen=True)
class MemoryWorkload:
    """N writes whose memory is measured: the call, the key it writes for ``i``."""

    label: str
    slug: str
    call: Callable[[Any, int], Any]
    data_key: Callable[[int], bytes]
    needs_keys: bool = False


def _key(slug: str, i: int) -> bytes:
    return f"m:{slug}:{i}".encode()


MEMORY_WORKLOADS = (
    MemoryWorkload("SET k v", "set", lambda c, i: c.set(_key("set", i), VALUE), lambda i: _key("set", i)),
    MemoryWorkload("SET k v EX 300", "setex", lambda c, i: c.set(_key("setex", i), VALUE, ex=300),
                   lambda i: _key("setex", i)),
    MemoryWorkload("HSET h f v (a hash per key)", "hset", lambda c, i: c.hset(_key("hset", i), "f", VALUE),
                   lambda i: _key("hset", i)),
    MemoryWorkload("HSET h f<i> v (one hash, N fields)", "hfield", lambda c, i: c.hset(b"m:hfield", f"f{i}", VALUE),
                   lambda i: b"m:hfield"),
    MemoryWorkload("INCRBY k 1", "incrby", lambda c, i: c.incrby(_key("incrby", i), 1), lambda i: _key("incrby", i)),
    MemoryWorkload("DEL k (of existing keys)", "del", lambda c, i: c.delete(_key("del", i)), lambda i: _key("del", i),
                   needs_keys=True),
)


class _Producer:
    """The stand-in producer ``wrap()`` reads its settings from; it never publishes here."""

    def __init__(self, url: str, write_stamps: bool) -> None:
        self.settings = Settings.from_mapping({
            "redis_retry_kafka": {"bootstrap.servers": "127.0.0.1:1"},  # never contacted
            "redis_retry_targets": {"default": url},
            "redis_retry_write_stamps": write_stamps,
        })


def _clients(server: RedisServer) -> dict[str, Any]:
    def plain() -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=SOCKET_TIMEOUT)

    return {
        "plain": plain(),
        "wrap()": wrap(plain(), producer=_Producer(server.url, True)),  # type: ignore[arg-type]
        "wrap() stamps off": wrap(plain(), producer=_Producer(server.url, False)),  # type: ignore[arg-type]
    }


def _time_calls(call: Call, client: Any, items: Sequence[Any], out: array) -> None:
    clock, append = time.perf_counter_ns, out.append
    for item in items:
        t0 = clock()
        call(client, item)
        append(clock() - t0)


def _create(admin: redis.Redis, keys: Sequence[bytes]) -> None:
    """The keys a DEL round deletes, written with plain pipelines (untimed)."""
    for start in range(0, len(keys), 1000):
        pipe = admin.pipeline(transaction=False)
        for key in keys[start:start + 1000]:
            pipe.set(key, VALUE)
        pipe.execute()


#: One timed row of an interleaved block: the call, its client, what each call is given.
Run = tuple[Call, Any, Sequence[Any]]


def _interleaved(runs: dict[str, Run], cpu_ns: dict[str, int] | None = None) -> dict[str, array]:
    """Every row's calls, the rows taking turns in chunks of :data:`CHUNK`, the first rotating.

    ``cpu_ns`` gets each row's CPU time of this process (user + system), the wait for
    Redis' replies left out.
    """
    names = list(runs)
    samples = {name: array("q") for name in names}
    count = min(len(items) for _, _, items in runs.values())
    cpu = time.process_time_ns
    gc.collect()
    for number, start in enumerate(range(0, count, CHUNK)):
        shift = number % len(names)
        for name in names[shift:] + names[:shift]:
            call, client, items = runs[name]
            before = cpu()
            _time_calls(call, client, items[start:start + CHUNK], samples[name])
            if cpu_ns is not None:
                cpu_ns[name] = cpu_ns.get(name, 0) + cpu() - before
    return samples


def _command_block(
    command: Command, clients: dict[str, Any], admin: redis.Redis, calls: int, tag: str
) -> dict[str, array]:
    """``calls`` timed calls of ``command`` per client, interleaved; the samples per client."""
    keys = {v: [f"b:{command.slug}:{tag}:{n}:{i}".encode() for i in range(calls)] for n, v in enumerate(VARIANTS)}
    if command.needs_keys:
        for variant in VARIANTS:
            _create(admin, keys[variant])
    samples = _interleaved({v: (command.call, clients[v], keys[v]) for v in VARIANTS})
    admin.flushall()
    return samples


def _latency(clients: dict[str, Any], admin: redis.Redis, calls: int, rounds: int) -> dict[str, Any]:
    # Warm-up: connections, the script's SHA (loaded on the first NOSCRIPT), settings, caches.
    for command in COMMANDS:
        _command_block(command, clients, admin, WARMUP, "warm")
    per_round: dict[str, dict[str, list[dict[str, float]]]] = {c.label: {v: [] for v in VARIANTS} for c in COMMANDS}
    pooled: dict[str, dict[str, array]] = {c.label: {v: array("q") for v in VARIANTS} for c in COMMANDS}
    for number in range(1, rounds + 1):
        started = time.perf_counter()
        # The command order rotates too, so no command always follows the same one.
        shift = (number - 1) % len(COMMANDS)
        for command in COMMANDS[shift:] + COMMANDS[:shift]:
            block = _command_block(command, clients, admin, calls, str(number))
            for variant, samples in block.items():
                per_round[command.label][variant].append(percentiles(samples))
                pooled[command.label][variant].extend(samples)
        set_row = per_round["SET k v"]
        print(
            f"round {number}/{rounds} ({time.perf_counter() - started:.1f} s): SET p50 "
            + ", ".join(f"{v} {set_row[v][-1]['p50']:.1f} us" for v in VARIANTS),
            flush=True,
        )
    results: dict[str, Any] = {}
    for command in COMMANDS:
        label = command.label
        stats = {v: percentiles(pooled[label][v], (50, 90, 99, 99.9)) for v in VARIANTS}
        ratios = {
            v: [w["p50"] / p["p50"] for w, p in zip(per_round[label][v], per_round[label]["plain"], strict=True)]
            for v in VARIANTS[1:]
        }
        results[label] = {
            "calls_per_round": calls,
            "stats_us": stats,
            "p50_ratio_over_plain": {v: stats[v]["p50"] / stats["plain"]["p50"] for v in VARIANTS[1:]},
            "per_round_p50_ratio": ratios,
            "per_round_p50_us": {v: [r["p50"] for r in per_round[label][v]] for v in VARIANTS},
        }
    return results


def _commandstats(admin: redis.Redis) -> dict[str, tuple[int, int]]:
    """``{command: (calls, usec)}`` from ``INFO commandstats``."""
    out: dict[str, tuple[int, int]] = {}
    for name, entry in admin.info("commandstats").items():
        out[name.removeprefix("cmdstat_").lower()] = (int(entry["calls"]), int(entry["usec"]))
    return out


def _server_us(stats: dict[str, tuple[int, int]], command: Command, calls: int) -> float:
    """Redis' time per call of what the client sent: the script (and its marker UNLINKs), or the command."""
    if "evalsha" in stats:
        used = stats["evalsha"][1] + stats.get("unlink", (0, 0))[1] + stats.get("script|load", (0, 0))[1]
    else:
        used = stats.get(command.name, (0, 0))[1]
    return used / calls


def _build_us(client: Any, command: Command, calls: int) -> float | None:
    """Python time per call of building the script's KEYS/ARGV (None when the write goes out as it is)."""
    capture = getattr(client, "_crr_capture", None)
    build = getattr(capture, "stamped_write", None)
    if build is None:
        return None
    argsets = [command.args(f"x:{i}".encode()) for i in range(calls)]
    if build(argsets[0]) is None:
        return None
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter_ns()
        for args in argsets:
            build(args)
        best = min(best, time.perf_counter_ns() - start)
    return best / calls / 1000


def _execute(client: Any, call: tuple[Any, ...]) -> Any:
    return client.execute_command(*call)


def _prebuilt(wrapped: Any, command: Command, keys: Sequence[bytes]) -> list[tuple[Any, ...]] | None:
    """The EVALSHA calls ``wrapped`` would send for ``keys``, built up front (None if it sends none)."""
    build = getattr(getattr(wrapped, "_crr_capture", None), "stamped_write", None)
    if build is None:
        return None
    calls = []
    for key in keys:
        write = build(command.args(key))
        if write is None:
            return None
        calls.append(write.call)
    return calls


def _breakdown(clients: dict[str, Any], admin: redis.Redis, calls: int) -> dict[str, Any]:
    """Per command: Redis' time per call of each client, and the p50 of the script sent without the wrapper."""
    out: dict[str, Any] = {}
    wrapped = clients[VARIANTS[1]]
    for command in COMMANDS:
        row: dict[str, Any] = {}
        for variant in VARIANTS:
            client = clients[variant]
            keys = [f"s:{command.slug}:{i}".encode() for i in range(calls)]
            if command.needs_keys:
                _create(admin, keys)
            admin.config_resetstat()
            for key in keys:
                command.call(client, key)
            stats = _commandstats(admin)
            row[variant] = {
                "server_us_per_call": _server_us(stats, command, calls),
                "build_us_per_call": _build_us(client, command, calls),
                "sent": sorted(n for n in stats if n not in ("config|resetstat", "info")),
            }
            admin.flushall()
        # The same EVALSHA as wrap() sends, built beforehand and sent by the plain client:
        # what the script and its longer request cost, without the wrapper's Python.
        keys = {name: [f"t:{command.slug}:{n}:{i}".encode() for i in range(calls)]
                for n, name in enumerate(("plain", "evalsha", "wrap()"))}
        if command.needs_keys:
            for names in keys.values():
                _create(admin, names)
        evalsha = _prebuilt(wrapped, command, keys["evalsha"])
        if evalsha is not None:  # the script is loaded: wrap() loaded it in the warm-up
            cpu_ns: dict[str, int] = {}
            samples = _interleaved({
                "plain": (command.call, clients["plain"], keys["plain"]),
                "evalsha": (_execute, clients["plain"], evalsha),
                "wrap()": (command.call, wrapped, keys["wrap()"]),
            }, cpu_ns)
            row["timed_us"] = {name: percentiles(s) for name, s in samples.items()}
            row["client_cpu_us_per_call"] = {name: ns / calls / 1000 for name, ns in cpu_ns.items()}
        admin.flushall()
        out[command.label] = row
    return out


def _used_memory(admin: redis.Redis) -> int:
    time.sleep(0.2)  # let serverCron finish any incremental rehashing of the keyspace
    return int(admin.info("memory")["used_memory"])


def _scan(admin: redis.Redis, pattern: str) -> list[bytes]:
    return list(admin.scan_iter(match=pattern, count=1000))


def _memory_usage(admin: redis.Redis, key: bytes | None) -> int | None:
    if key is None:
        return None
    used = admin.memory_usage(key, samples=0)
    return int(used) if used is not None else None


def _memory(clients: dict[str, Any], admin: redis.Redis, count: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for workload in MEMORY_WORKLOADS:
        row: dict[str, Any] = {}
        for variant in VARIANTS:
            client = clients[variant]
            admin.flushall()
            if workload.needs_keys:
                _create(admin, [workload.data_key(i) for i in range(count)])
            before = _used_memory(admin)
            keys_before = admin.dbsize()
            for i in range(count):
                workload.call(client, i)
            after = _used_memory(admin)
            markers = _scan(admin, "crr:*:applied:*")
            stamp_keys = _scan(admin, "crr:*}:w")
            data_key = workload.data_key(0)
            sample_stamp = stamp_keys[0] if stamp_keys else None
            entry = {
                "keys_before": keys_before,
                "keys_after": admin.dbsize(),
                "stamp_keys": len(stamp_keys),
                "markers_left": len(markers),
                "used_memory_delta": after - before,
                "bytes_per_write": (after - before) / count,
                "memory_usage_data_key": _memory_usage(admin, data_key) if admin.exists(data_key) else None,
                "memory_usage_stamp_key": _memory_usage(admin, sample_stamp),
                "stamp_key_fields": admin.hlen(sample_stamp) if sample_stamp else None,
                "memory_usage_marker_key": _memory_usage(admin, markers[0] if markers else None),
            }
            if markers:
                # What stays once the batched UNLINK has dropped the confirmed markers.
                for start in range(0, len(markers), 1000):
                    admin.unlink(*markers[start:start + 1000])
                steady = _used_memory(admin)
                entry["used_memory_delta_steady"] = steady - before
            entry["bytes_per_write_steady"] = entry.get("used_memory_delta_steady", after - before) / count
            row[variant] = entry
        out[workload.label] = row
        print(f"memory {workload.label}: " + ", ".join(
            f"{v} {row[v]['bytes_per_write']:.0f} B/write" for v in VARIANTS), flush=True)
    admin.flushall()
    return out


def _redis_version() -> str | None:
    try:
        done = subprocess.run([redis_server_binary(), "--version"], capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def run(calls: int, rounds: int, keys: int) -> tuple[dict[str, Any], str]:
    """Measure latency, its breakdown and memory; return the JSON payload and the markdown report."""
    started = time.perf_counter()
    server = RedisServer().start()
    try:
        admin = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=SOCKET_TIMEOUT)
        clients = _clients(server)
        print(f"redis-server {server.url} (pid {server.pid}); {calls:,} calls x {rounds} rounds per command and "
              f"client; {keys:,} keys for memory", flush=True)
        admin.flushall()
        latency = _latency(clients, admin, calls, rounds)
        breakdown = _breakdown(clients, admin, min(BREAKDOWN_CALLS, calls))
        memory = _memory(clients, admin, keys)
        redis_info = {**admin.info("server"), **admin.info("memory")}
        for client in (*clients.values(), admin):
            client.close()
    finally:
        server.stop()
    elapsed = time.perf_counter() - started
    overhead = timer_overhead_us(100_000)
    info = machine()
    code = code_under_test()
    return _report(calls=calls, rounds=rounds, keys=keys, latency=latency, breakdown=breakdown, memory=memory,
                   redis_info=redis_info, overhead=overhead, elapsed=elapsed, info=info, code=code)


def _report(
    *, calls: int, rounds: int, keys: int, latency: dict[str, Any], breakdown: dict[str, Any], memory: dict[str, Any],
    redis_info: dict[str, Any], overhead: float, elapsed: float, info: dict[str, Any], code: dict[str, Any],
) -> tuple[dict[str, Any], str]:
    wrapped, off = VARIANTS[1], VARIANTS[2]
    set_ratio = latency["SET k v"]["p50_ratio_over_plain"][wrapped]
    set_diff = latency["SET k v"]["stats_us"][wrapped]["p50"] - latency["SET k v"]["stats_us"]["plain"]["p50"]
    goal_met = set_ratio <= GOAL_SET_RATIO

    def rng(values: Sequence[float]) -> str:
        return f"{min(values):.2f}-{max(values):.2f}"

    latency_rows = []
    for label, result in latency.items():
        stats, ratio, spread = result["stats_us"], result["p50_ratio_over_plain"], result["per_round_p50_ratio"]
        latency_rows.append([
            label, stats["plain"]["p50"], stats[wrapped]["p50"], stats[off]["p50"],
            stats[wrapped]["p50"] - stats["plain"]["p50"],
            f"{ratio[wrapped]:.2f}x", f"{ratio[off]:.2f}x", rng(spread[wrapped]), rng(spread[off]),
        ])
    tail_rows = [
        [label, variant, *(result["stats_us"][variant][p] for p in ("p50", "p90", "p99", "p99.9", "max", "mean"))]
        for label, result in latency.items() for variant in VARIANTS
    ]
    breakdown_rows = []
    for label, row in breakdown.items():
        build = row[wrapped]["build_us_per_call"]
        timed = row.get("timed_us")
        plain_p50, evalsha_p50, wrap_p50 = (
            (timed["plain"]["p50"], timed["evalsha"]["p50"], timed["wrap()"]["p50"]) if timed else ("-",) * 3
        )
        breakdown_rows.append([
            label, plain_p50, evalsha_p50, wrap_p50,
            evalsha_p50 - plain_p50 if timed else "-", wrap_p50 - evalsha_p50 if timed else "-",
            "-" if build is None else build,
            *((row["client_cpu_us_per_call"][n] for n in ("plain", "evalsha", "wrap()")) if timed else ("-",) * 3),
            row["plain"]["server_us_per_call"], row[wrapped]["server_us_per_call"], row[off]["server_us_per_call"],
        ])
    memory_rows = []
    for label, row in memory.items():
        plain, stamped, unstamped = row["plain"], row[wrapped], row[off]
        memory_rows.append([
            label, plain["bytes_per_write"], stamped["bytes_per_write"], stamped["bytes_per_write_steady"],
            unstamped["bytes_per_write_steady"],
            f"{stamped['bytes_per_write_steady'] / plain['bytes_per_write']:.2f}x"
            if plain["bytes_per_write"] > 0 else "-",
            f"{plain['keys_after']:,} / {stamped['keys_after']:,} / {unstamped['keys_after']:,}",
            f"{stamped['markers_left']:,} / {unstamped['markers_left']:,}",
        ])
    usage_rows = [
        [label, *(row[v][k] if row[v][k] is not None else "-" for v, k in (
            ("plain", "memory_usage_data_key"), (wrapped, "memory_usage_data_key"),
            (wrapped, "memory_usage_stamp_key"), (wrapped, "stamp_key_fields"),
            (wrapped, "memory_usage_marker_key"), (off, "memory_usage_marker_key"),
        ))]
        for label, row in memory.items()
    ]
    per_round_headers = ["command", *(f"round {n} ratio" for n in range(1, rounds + 1))]
    per_round_rows = [
        [label, *(f"{r:.2f}x" for r in result["per_round_p50_ratio"][wrapped])] for label, result in latency.items()
    ]
    redis_line = (f"redis-server {redis_info.get('redis_version')} ({redis_info.get('mem_allocator', '?')}), "
                  "started by the benchmark, no persistence, TCP 127.0.0.1")
    lines = [
        f"# {NAME}: writes through wrap() vs plain redis-py",
        "",
        f"{calls:,} calls per command, client and round, {rounds} rounds; the three clients take turns in chunks "
        f"of {CHUNK} calls on one {redis_line}, one connection each, every call on a distinct key, 32-byte values. "
        "Percentiles over every round's samples; ratio = p50 / plain p50.",
        "",
        markdown_table(
            ["command", "plain p50 us", "wrap() p50 us", "stamps off p50 us", "wrap() - plain us", "wrap() / plain",
             "stamps off / plain",
             "wrap() ratio over rounds", "stamps off ratio over rounds"],
            latency_rows,
        ),
        "",
        f"- goal SET via wrap() p50 <= {GOAL_SET_RATIO:g}x plain: **{'met' if goal_met else 'MISSED'}** "
        f"({set_ratio:.3f}x; {set_diff:+.1f} us)",
        f"- every sample includes ~{overhead:.3f} us of clock reads (perf_counter_ns twice)",
        "- `wrap() stamps off` sends SET, HSET and DEL as they are; its INCRBY still runs the script for the "
        "dedupe marker",
        "",
        f"Where the time goes ({min(BREAKDOWN_CALLS, calls):,} calls each): p50 of plain redis-py, of the very "
        "EVALSHA wrap() sends but built beforehand and sent by the plain client (the script and its longer "
        "request, without the wrapper), and of wrap(), interleaved; the Python time of building the script's "
        "KEYS/ARGV (`_Capture.stamped_write`, mean); this process' CPU time per call (user + system, the wait "
        "for the reply left out) in the same interleaved calls; Redis' own time per call from `INFO commandstats` (the "
        "script and the batched marker UNLINKs, or the command), each client alone:",
        "",
        markdown_table(
            ["command", "plain p50 us", "prebuilt EVALSHA p50 us", "wrap() p50 us", "script cost us",
             "wrapper Python us", "stamped_write() us", "client CPU us plain", "client CPU us EVALSHA",
             "client CPU us wrap()", "Redis us/call plain", "Redis us/call wrap()",
             "Redis us/call stamps off"],
            breakdown_rows,
        ),
        "",
        "script cost = prebuilt EVALSHA - plain; wrapper Python = wrap() - prebuilt EVALSHA (stamped_write, "
        "execute_command's extra frames, the reply callback).",
        "",
        f"Memory per write: `used_memory` delta / {keys:,} writes, database flushed before each; steady = once the "
        "markers still waiting for their batched UNLINK are gone (what stays for the stamps' lifetime):",
        "",
        markdown_table(
            ["writes", "plain B/write", "wrap() B/write", "wrap() steady B/write", "stamps off steady B/write",
             "wrap() steady / plain", "keys after (plain / wrap() / off)",
             "markers left (wrap() / off)"],
            memory_rows,
        ),
        "",
        "`MEMORY USAGE` (bytes) of the first data key, its stamp key and a marker key:",
        "",
        markdown_table(
            ["writes", "data key plain", "data key wrap()", "stamp key wrap()", "stamp fields",
             "marker wrap()", "marker stamps off"],
            usage_rows,
        ),
        "",
        "Latency tails:",
        "",
        markdown_table(["command", "client", "p50 us", "p90 us", "p99 us", "p99.9 us", "max us", "mean us"],
                       tail_rows),
        "",
        "Per-round wrap() / plain p50:",
        "",
        markdown_table(per_round_headers, per_round_rows),
        "",
        f"Run time {elapsed:.0f} s. Code: {describe_code(code)}.",
        "",
        f"Machine: {describe_machine(info)}",
    ]
    summary: list[dict[str, Any]] = []
    for label, result in latency.items():
        stats = result["stats_us"]
        summary.append({
            "what": f"wrap() {label} latency p50", "unit": "us", "project": stats[wrapped]["p50"],
            "raw": stats["plain"]["p50"], "raw_what": "redis-py, same server",
            "ratio": result["p50_ratio_over_plain"][wrapped],
            "goal": f"<= {GOAL_SET_RATIO:g}x raw" if label == "SET k v" else None,
            "met": goal_met if label == "SET k v" else None,
        })
    for label in ("SET k v", "HSET h f v (a hash per key)", "INCRBY k 1"):
        row = memory[label]
        plain_bytes = row["plain"]["bytes_per_write"]
        summary.append({
            "what": f"Redis memory per write, wrap() {label}", "unit": "bytes",
            "project": row[wrapped]["bytes_per_write_steady"], "raw": plain_bytes,
            "raw_what": "redis-py, same server",
            "ratio": row[wrapped]["bytes_per_write_steady"] / plain_bytes if plain_bytes > 0 else None,
            "goal": None, "met": None,
        })
    payload = {
        "calls": calls,
        "rounds": rounds,
        "chunk": CHUNK,
        "warmup_calls": WARMUP,
        "memory_keys": keys,
        "value_bytes": len(VALUE),
        "latency": latency,
        "breakdown": breakdown,
        "memory": memory,
        "goals": {f"set_wrap_p50_le_{GOAL_SET_RATIO:g}x_plain": goal_met},
        "summary": summary,
        "timer_overhead_us": overhead,
        "run_seconds": elapsed,
        "servers": {"redis-server": _redis_version()},
        "code": code,
        "machine": info,
    }
    return payload, "\n".join(lines)


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_wrap", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=5_000,
                        help="timed calls per command, client and round (default 5,000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--keys", type=int, default=10_000, help="writes per memory measurement (default 10,000)")
    parser.add_argument("--json", metavar="PATH", help=f"results file (default {RESULTS_DIR}/{NAME}.json; .md beside)")
    args = parser.parse_args(list(argv))
    if args.calls < 1 or args.rounds < 1 or args.keys < 1:
        parser.error("--calls, --rounds and --keys must be >= 1")
    payload, markdown = run(args.calls, args.rounds, args.keys)
    publish_results(NAME, payload, markdown, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
