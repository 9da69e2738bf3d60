"""Exactly-once effects, stale-write guards and true TTLs, on a single Redis and on a Redis Cluster.

The executor tests run the real Lua step against real redis-server processes; the loop
tests run the whole system (Kafka, bridge, a prefork worker whose children are killed
after applying and before acknowledging) and count effects in Redis. Every test that
touches a server runs twice (``redis_and_valkey``): on redis-server, then on valkey-server.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from loop_stack import LoopStack

from celery_redis_retry import message, ops
from celery_redis_retry.config import Settings
from celery_redis_retry.errors import CrossSlotError, EncodeError, PermanentReplayError
from celery_redis_retry.expiry import expired
from celery_redis_retry.redis_commands import COMMANDS, DEFAULT_ALLOWED, LUA_MAX_ARGS, is_idempotent
from celery_redis_retry.replay.executor import Executor
from celery_redis_retry.replay.steps import STEP_OPS
from celery_redis_retry.slots import marker_key
from celery_redis_retry.testing import RedisCluster, RedisServer

#: Each test that uses a server (``target``, ``cluster``, ``make_loop``) runs on redis-server and on valkey-server.
pytestmark = [pytest.mark.redis_and_valkey, pytest.mark.slow]

TARGETS = ["single", "cluster"]


@pytest.fixture(scope="module")
def clusters() -> Iterator[dict[str, RedisCluster]]:
    """The module's 3-master clusters by server binary, each started on first use."""
    started: dict[str, RedisCluster] = {}
    yield started
    for running in started.values():
        running.stop()


@pytest.fixture
def cluster(
    clusters: dict[str, RedisCluster], target_server: str, tmp_path_factory: pytest.TempPathFactory
) -> RedisCluster:
    """A 3-master cluster of ``target_server`` processes, shared by the module's tests."""
    if target_server not in clusters:
        clusters[target_server] = RedisCluster(
            3, dir=str(tmp_path_factory.mktemp("cluster")), binary=target_server
        ).start()
    return clusters[target_server]


@pytest.fixture(params=TARGETS)
def target(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[tuple[Executor, Any]]:
    """An executor and a client for a single server, then for a 3-master cluster (of ``target_server``)."""
    server: Any = redis_server if request.param == "single" else request.getfixturevalue("cluster")
    settings = Settings.from_mapping(
        {
            "redis_retry_kafka": {"bootstrap.servers": "127.0.0.1:1"},
            "redis_retry_targets": {"default": server.url},
            "redis_retry_scripts": {"bump": "return redis.call('INCRBY', KEYS[1], ARGV[1])"},
        }
    )
    client = server.client()
    client.flushall() if request.param == "single" else client.flushall(target_nodes="primaries")
    yield Executor(settings), client
    client.close()


# -- the idempotency table ------------------------------------------------------------------


def test_every_allowed_command_has_an_idempotency_class() -> None:
    for name in DEFAULT_ALLOWED:
        assert isinstance(COMMANDS[name].idempotent, bool), name
    assert not is_idempotent(("ZADD", "z", "INCR", 1, "m"))
    assert is_idempotent(("ZADD", "z", 1, "m"))
    for name in ("INCR", "INCRBY", "HINCRBY", "LPUSH", "RPUSH", "APPEND", "ZINCRBY", "XADD", "RENAME"):
        assert not COMMANDS[name].idempotent, name


# -- at most once, whatever the deliveries ------------------------------------------------


def test_non_idempotent_ops_apply_once_however_often_they_run(target: tuple[Executor, Any]) -> None:
    executor, r = target
    built = [ops.incrby("{c}n", 5), ops.rpush("{c}l", "a", b"\xff"), ops.command("HINCRBY", "{c}h", "f", 2),
             ops.command("APPEND", "{c}s", "x"), ops.command("ZINCRBY", "{c}z", 1.5, "m")]
    outcomes = [executor.run(op).outcome for _ in range(3) for op in built]
    assert outcomes == ["applied"] * 5 + ["duplicate"] * 10
    assert r.get("{c}n") == b"5"
    assert r.lrange("{c}l", 0, -1) == [b"a", b"\xff"]
    assert r.hget("{c}h", "f") == b"2"
    assert r.get("{c}s") == b"x"
    assert r.zscore("{c}z", "m") == 1.5


def test_a_transaction_applies_once_and_atomically(target: tuple[Executor, Any]) -> None:
    executor, r = target
    tx = ops.pipeline([ops.incrby("acct:{42}:balance", -30), ops.rpush("acct:{42}:history", "debit 30")])
    assert [executor.run(tx).outcome for _ in range(3)] == ["applied", "duplicate", "duplicate"]
    assert r.get("acct:{42}:balance") == b"-30"
    assert r.lrange("acct:{42}:history", 0, -1) == [b"debit 30"]


def test_a_batch_applies_each_op_once_in_few_script_calls_however_often_it_runs(
    target: tuple[Executor, Any],
) -> None:
    executor, r = target
    count = 2 * STEP_OPS + 50  # more than one Lua step's worth
    batch = [
        op
        for n in range(count // 3)
        for op in (ops.incrby(f"n:{n}", n), ops.rpush(f"l:{n}", f"x{n}"), ops.set(f"s:{n}", f"v{n}"))
    ]
    single = not hasattr(r, "get_nodes")
    if single:
        executor.run_many([ops.incrby("warm", 1)])  # the script is loaded: no NOSCRIPT round below
        r.config_resetstat()
    outcomes = [[result.outcome for result in executor.run_many(batch)] for _ in range(3)]  # type: ignore[union-attr]
    assert outcomes[0] == ["applied"] * len(batch)
    # SET needs no marker (running it again changes nothing); the others are found done.
    assert outcomes[1] == outcomes[2] == ["duplicate", "duplicate", "applied"] * (len(batch) // 3)
    for n in range(count // 3):
        assert (r.get(f"n:{n}"), r.lrange(f"l:{n}", 0, -1), r.get(f"s:{n}")) == (
            str(n).encode(), [f"x{n}".encode()], f"v{n}".encode()
        )
    if single:
        # Each run: one script call per STEP_OPS ops, not one per op.
        calls = r.info("commandstats")["cmdstat_evalsha"]["calls"]
        assert calls == 3 * -(-len(batch) // STEP_OPS), calls


def test_a_registered_script_applies_once(target: tuple[Executor, Any]) -> None:
    executor, r = target
    op = ops.script("bump", keys=["hits"], args=[3])
    assert [executor.run(op).outcome for _ in range(2)] == ["applied", "duplicate"]
    assert r.get("hits") == b"3"


def test_the_marker_shares_the_slot_of_the_ops_keys(cluster: RedisCluster) -> None:
    from celery_redis_retry.slots import slot_of

    for key in ["plain", "user:{42}:name", "weird}key", "{}", b"\x00\xff", 12345]:
        op = ops.incrby(key, 1)
        assert slot_of(marker_key(op)) == slot_of(key), key


def test_a_failing_command_is_reported_and_the_rest_stays_applied_once(target: tuple[Executor, Any]) -> None:
    executor, r = target
    r.set("{p}str", "x")
    tx = ops.pipeline([ops.incrby("{p}n", 1), ops.lpush("{p}str", "v"), ops.incrby("{p}m", 1)])
    with pytest.raises(PermanentReplayError) as failure:
        executor.run(tx)
    assert failure.value.reason == "wrong_type"
    assert "command 1 (LPUSH)" in str(failure.value)
    assert (r.get("{p}n"), r.get("{p}m")) == (b"1", b"1")  # like MULTI/EXEC: the others ran
    assert executor.run(tx).outcome == "duplicate"
    assert (r.get("{p}n"), r.get("{p}m")) == (b"1", b"1")


def test_commands_too_long_for_lua_are_refused_clearly(target: tuple[Executor, Any]) -> None:
    executor, _ = target
    with pytest.raises(PermanentReplayError, match="too many to apply atomically") as failure:
        executor.run(ops.rpush("big", *range(LUA_MAX_ARGS)))
    assert failure.value.reason == "too_large"


# -- pipelines across cluster slots --------------------------------------------------------


def test_a_cross_slot_pipeline_replays_only_the_slots_not_yet_applied(cluster: RedisCluster) -> None:
    settings = Settings.from_mapping(
        {"redis_retry_kafka": {"bootstrap.servers": "127.0.0.1:1"}, "redis_retry_targets": {"default": cluster.url}}
    )
    executor = Executor(settings)
    keys = ["alpha", "beta", "gamma", "delta"]
    from celery_redis_retry.slots import slot_of

    assert len({slot_of(k) for k in keys}) == 4
    pipe = ops.pipeline([ops.incrby(k, 1) for k in keys], transaction=False)
    settings.check_op(pipe)  # a non-transactional pipeline may span slots
    with cluster.client() as r:
        r.flushall(target_nodes="primaries")
        # As if an earlier attempt had applied the first slot group, then failed.
        r.incrby("alpha", 1)
        r.set(marker_key(pipe, "alpha", 0), 1, px=60_000)
        assert executor.run(pipe).outcome == "applied"
        assert [r.get(k) for k in keys] == [b"1", b"1", b"1", b"1"]
        assert executor.run(pipe).outcome == "duplicate"
        assert [r.get(k) for k in keys] == [b"1", b"1", b"1", b"1"]


def test_atomic_ops_spanning_slots_are_refused_at_capture_for_a_cluster_target(cluster: RedisCluster) -> None:
    settings = Settings.from_mapping(
        {"redis_retry_kafka": {"bootstrap.servers": "127.0.0.1:1"}, "redis_retry_targets": {"default": cluster.url}}
    )
    for op in [
        ops.pipeline([ops.incrby("alpha", 1), ops.incrby("beta", 1)]),
        ops.delete("alpha", "beta"),
        ops.set("alpha", 1).if_value(0, key="beta"),
    ]:
        with pytest.raises(CrossSlotError, match="hash tag"):
            settings.check_op(op)
    settings.check_op(ops.pipeline([ops.incrby("{u}a", 1), ops.incrby("{u}b", 1)]))
    single = Settings.from_mapping(
        {"redis_retry_kafka": {"bootstrap.servers": "x:1"}, "redis_retry_targets": {"default": "redis://h:1/0"}}
    )
    single.check_op(ops.pipeline([ops.incrby("alpha", 1), ops.incrby("beta", 1)]))  # not a cluster: fine


# -- stale-write guards --------------------------------------------------------------------


def test_if_value_applies_only_over_the_value_it_replaces(target: tuple[Executor, Any]) -> None:
    executor, r = target
    r.set("profile", "v0")
    stale = ops.set("profile", "v1", if_value="v0")
    r.set("profile", "v2")  # the application moved on
    assert executor.run(stale).outcome == "superseded"
    assert r.get("profile") == b"v2"
    fresh = ops.set("profile", "v3", if_value="v2")
    assert executor.run(fresh).outcome == "applied"
    assert r.get("profile") == b"v3"
    assert executor.run(fresh).outcome == "duplicate"


def test_if_value_on_a_hash_field_and_if_absent(target: tuple[Executor, Any]) -> None:
    executor, r = target
    r.hset("user:{7}", mapping={"email": "old@x"})
    assert executor.run(ops.hset("user:{7}", "email", "new@x").if_value("old@x", field="email")).outcome == "applied"
    assert executor.run(ops.hset("user:{7}", "email", "z@x").if_value("old@x", field="email")).outcome == "superseded"
    assert r.hget("user:{7}", "email") == b"new@x"
    assert executor.run(ops.set("lock:{7}", "me").if_absent()).outcome == "applied"
    assert executor.run(ops.set("lock:{7}", "you").if_absent()).outcome == "superseded"
    assert r.get("lock:{7}") == b"me"
    assert executor.run(ops.hset("user:{7}", "nick", "n").if_absent(field="nick")).outcome == "applied"
    assert executor.run(ops.hset("user:{7}", "nick", "m").if_absent(field="nick")).outcome == "superseded"


def test_if_version_keeps_versions_growing(target: tuple[Executor, Any]) -> None:
    executor, r = target
    v5 = ops.hset("doc:{9}", {"body": "five"}).if_version(5, field="version")
    v4 = ops.hset("doc:{9}", {"body": "four"}).if_version(4, field="version")
    assert executor.run(v5).outcome == "applied"
    assert r.hgetall("doc:{9}") == {b"body": b"five", b"version": b"5"}
    assert executor.run(v4).outcome == "superseded"
    assert r.hget("doc:{9}", "body") == b"five"
    companion = ops.set("doc:{9}:html", "<p>6</p>", ex=60).if_version(6, key="doc:{9}:v")
    assert executor.run(companion).outcome == "applied"
    assert r.get("doc:{9}:v") == b"6"
    assert executor.run(ops.set("doc:{9}:html", "<p>3</p>").if_version(3, key="doc:{9}:v")).outcome == "superseded"
    assert r.get("doc:{9}:html") == b"<p>6</p>"


def test_guards_round_trip_and_are_validated() -> None:
    op = ops.set("k", b"\xff", if_value=b"\x00")
    assert message.decode(message.encode(op)) == op
    with pytest.raises(EncodeError, match="one"):
        op.if_absent()
    with pytest.raises(EncodeError, match=r"field= .* or key="):
        ops.set("k", 1).if_version(2)
    with pytest.raises(EncodeError, match="scripts cannot carry a guard"):
        ops.script("bump", keys=["k"]).if_absent()
    with pytest.raises(EncodeError, match="guard the pipeline as a whole"):
        ops.pipeline([ops.set("k", 1).if_absent()])


# -- true TTLs -----------------------------------------------------------------------------


def test_a_late_replay_keeps_the_original_expiry(target: tuple[Executor, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    executor, r = target
    real_now = time.time()
    monkeypatch.setattr("celery_redis_retry.ops.time.time", lambda: real_now - 6)  # captured 6 s ago
    op = ops.set("session", "s", ex=10)
    monkeypatch.undo()
    assert expired(op) is None
    executor.run(op)
    assert 0 < r.pttl("session") <= 4000


def test_ops_past_their_expiry_or_deadline_are_expired() -> None:
    old = time.time() - 20
    assert expired(ops.set("k", 1, px=1000), now=time.time() + 2) is not None
    assert expired(ops.expire("k", 1), now=time.time() + 2) is not None
    assert expired(ops.set("k", 1).with_deadline(5), now=time.time() + 6) is not None
    assert expired(ops.set("k", 1, ex=30), now=old + 60) is not None
    assert expired(ops.set("k", 1, ex=30)) is None


# -- the whole loop, three deliveries per op, children killed after applying ---------------


def _counter_ops(count: int, seed: int) -> tuple[list[Any], dict[str, int], dict[str, list[bytes]]]:
    rng = random.Random(seed)
    built: list[Any] = []
    sums: dict[str, int] = {}
    lists: dict[str, list[bytes]] = {}
    for i in range(count):
        if i % 2:
            key = f"counter:{rng.randrange(300)}"
            amount = rng.randrange(1, 1000)
            built.append(ops.incrby(key, amount))
            sums[key] = sums.get(key, 0) + amount
        else:
            key = f"list:{rng.randrange(300)}"
            built.append(ops.rpush(key, f"item-{i}"))
            lists.setdefault(key, []).append(f"item-{i}".encode())
    return built, sums, lists


@pytest.mark.slow
@pytest.mark.parametrize("kind", TARGETS)
def test_every_op_has_exactly_one_effect_despite_triple_delivery_and_killed_workers(
    make_loop: Callable[..., LoopStack], kind: str
) -> None:
    # About one replay task in twenty loses its worker child right after applying.
    stack = make_loop(cluster=kind == "cluster", extra_env={"CRR_KILL_AFTER_APPLY": "0.05"})
    count = 10_000
    built, sums, lists = _counter_ops(count, seed=11)
    stack.start_worker(concurrency=2)
    bridge = stack.start_bridge()
    for _ in range(3):  # every op reaches Kafka three times
        for op in built:
            stack.producer.publish(op)
    assert stack.producer.flush(60) == 0
    stack.wait_assigned(bridge)

    def effects_complete(r: Any) -> bool:
        counters = r.mget(list(sums)) if kind == "single" else [r.get(k) for k in sums]
        return all(v is not None and int(v) >= sums[k] for k, v in zip(sums, counters, strict=True)) and all(
            r.llen(k) >= len(v) for k, v in lists.items()
        )

    with stack.client() as r:
        stack.wait_for(lambda: effects_complete(r), 420, f"all {count} ops applied")
        # Every duplicate delivery must have run too before the effects are final.
        stack.wait_for(lambda: stack.worker_log_count(r"was already applied") >= 2 * count, 400,
                       f"the {2 * count} duplicate deliveries to be caught")
        stack.wait_for(lambda: _worker_idle(stack), 400, "the worker to go idle")
        assert {k: int(r.get(k)) for k in sums} == sums
        assert {k: sorted(r.lrange(k, 0, -1)) for k in lists} == {k: sorted(v) for k, v in lists.items()}
    killed = stack.worker_log_count(r"Process '\S+' pid:\d+ exited with 'signal 9")
    duplicates = stack.worker_log_count(r"was already applied")
    print(f"\n{kind}: {count} ops x3 deliveries: {duplicates} duplicates caught, {killed} children killed")
    assert duplicates >= 2 * count, "every op was delivered three times"
    assert killed > 0, "the chaos hook should have killed some children"
    assert stack.dlq_is_empty()


def _worker_idle(stack: LoopStack) -> bool:
    assert stack.worker is not None
    before = stack.worker.log_text()
    time.sleep(2.0)
    return stack.worker.log_text() == before


@pytest.mark.slow
@pytest.mark.parametrize("kind", TARGETS)
def test_guarded_stale_write_is_superseded_and_ttls_stay_true(make_loop: Callable[..., LoopStack], kind: str) -> None:
    stack = make_loop(cluster=kind == "cluster")
    stack.start_worker()
    bridge = stack.start_bridge()
    with stack.client() as r:
        r.set("profile:{1}", "v0")
        stack.publish_all([ops.set("warm-up:{1}", 1)])  # the topic exists and the group owns it
        stack.wait_assigned(bridge)
        stack.wait_for(lambda: r.exists("warm-up:{1}"), 60, "the loop to be up")
        # The write of v1 fails and is captured with a guard on the value it replaces...
        stale = ops.set("profile:{1}", "v1", if_value="v0")
        session = ops.set("session:{1}", "token", ex=10)  # replayed 6 s after its capture
        short = ops.set("flash:{1}", "bye", px=1500)  # its expiry passes before the replay
        r.set("profile:{1}", "v2")  # ...then the application writes v2 directly
        time.sleep(6 - (time.time() - session.created_at))
        stack.publish_all([stale, session, short])
        assert stack.worker is not None
        stack.worker.wait_for_log(rf"op {stale.id} superseded", timeout=60)
        bridge.wait_for_log(rf"op {short.id} expired", timeout=60)  # ended as it is read: no task
        stack.wait_for(lambda: r.exists("session:{1}"), 60, "the session replayed")
        assert r.get("profile:{1}") == b"v2"
        remaining = r.pttl("session:{1}")
        waited = time.time() - session.created_at
        print(f"\n{kind}: SET EX 10 replayed {waited:.1f} s after capture: PTTL {remaining} ms")
        assert 0 < remaining <= 4000
        assert not r.exists("flash:{1}")
    assert stack.dlq_is_empty()
