"""Critical ops go ahead of an ordinary backlog, and never ahead of an earlier op of their key.

Real processes: the bridge and a ``celery worker`` (one process, so that one queue is
replayed in its order) as subprocesses, a Redis Celery broker, the embedded Kafka broker.
Every op is a MULTI of two RPUSHes: its tag onto its own key's list (per-key order) and
onto one ``applied`` list (the order in which ops were applied, across keys).

The drain: 20,000 ordinary ops, then 500 critical ones, all handed to Celery while no
worker runs; then the worker starts. 450 critical ops are for keys of their own: each
must be applied before half the ordinary backlog is. 50 are for keys that also have
ordinary ops in the backlog: those must stay behind them (their lists in publish order).
Then critical ops that arrive mid-drain, with the default prefetch multiplier and with 1:
the figures of docs/operations.md (Priorities).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from loop_stack import LoopStack

from celery_redis_retry import ops
from celery_redis_retry.ops import RedisOp

pytestmark = pytest.mark.slow

ORDINARY = 20_000
CRITICAL_OWN = 450  # critical ops for keys of their own
MIXED_KEYS = 5  # keys with ordinary ops in the backlog, then critical ones
MIXED_ORDINARY, MIXED_CRITICAL = 20, 10  # per mixed key
ORDINARY_KEYS = 200
PADDING = 10  # SETs in each op of the mid-drain backlog


def _logged(key: str, tag: str, padding: tuple[RedisOp, ...] = ()) -> RedisOp:
    """An op that appends ``tag`` to ``key``'s list and to the ``applied`` list (then runs ``padding``), atomically."""
    return ops.pipeline([ops.rpush(key, tag), ops.rpush("applied", tag), *padding], transaction=True)


def _backlog() -> tuple[list[RedisOp], dict[str, list[str]]]:
    """The ops in publish order, and each key's tags in that order."""
    published: list[tuple[str, str, bool]] = []  # key, tag, critical
    mixed_every = ORDINARY // (MIXED_KEYS * MIXED_ORDINARY)
    for seq in range(ORDINARY):
        if seq % mixed_every == 0:
            mixed = seq // mixed_every % MIXED_KEYS
            published.append((f"mixed:{mixed}", f"o{seq}", False))
        else:
            published.append((f"ordinary:{seq % ORDINARY_KEYS}", f"o{seq}", False))
    for seq in range(CRITICAL_OWN):
        published.append((f"critical:{seq % 50}", f"c{seq}", True))
    for seq in range(MIXED_KEYS * MIXED_CRITICAL):
        published.append((f"mixed:{seq % MIXED_KEYS}", f"m{seq}", True))
    built, per_key = [], {}
    for key, tag, critical in published:
        op = _logged(key, tag)
        built.append(op.with_priority("critical") if critical else op)
        per_key.setdefault(key, []).append(tag)
    return built, per_key


def _queued(stack: LoopStack) -> tuple[int, int]:
    """Tasks waiting in the replay queue and in the critical queue."""
    assert stack.broker is not None
    with stack.broker.client() as broker:
        queue = f"queue-{stack.name}"
        return int(broker.llen(queue)), int(broker.llen(f"{queue}.critical"))


def _all_handed_over(stack: LoopStack, batch: int) -> Callable[[], bool]:
    """True once both queues hold at least the full batches of the backlog and kept their length
    for two looks in a row (batches sent on linger hold fewer ops: there may be more tasks)."""
    ordinary_ops = ORDINARY + MIXED_KEYS * MIXED_CRITICAL  # the mixed keys' critical ops stay ordinary
    least = (ordinary_ops // batch, CRITICAL_OWN // batch)
    last: list[tuple[int, int]] = []

    def check() -> bool:
        now = _queued(stack)
        steady = bool(last) and last[-1] == now and now[0] >= least[0] and now[1] >= least[1]
        last.append(now)
        return steady

    return check


@pytest.mark.parametrize("prefetch", [4, 1])
def test_critical_ops_are_applied_ahead_of_the_backlog_and_never_ahead_of_their_key(
    make_loop: Callable[..., LoopStack], prefetch: int
) -> None:
    batch = 100
    stack = make_loop(extra_env={"CRR_HIGH_WATER": "0", "CRR_PREFETCH": str(prefetch), "CRR_BATCH_SIZE": str(batch)})
    built, per_key = _backlog()
    bridge = stack.start_bridge()
    stack.wait_assigned(bridge)
    stack.publish_all(built)
    stack.wait_for(_all_handed_over(stack, batch), 60, "every op handed to Celery, in both lanes")
    ordinary_tasks, critical_tasks = _queued(stack)

    started = time.monotonic()
    stack.start_worker(concurrency=1)
    with stack.client() as r:
        stack.wait_for(lambda: r.llen("applied") >= len(built), 120, "every op applied")
        applied = [tag.decode() for tag in r.lrange("applied", 0, -1)]
        lists = {key: [tag.decode() for tag in r.lrange(key, 0, -1)] for key in per_key}
    drained = time.monotonic() - started

    assert len(applied) == len(built), "an op was applied twice"
    # The ordinary ops applied before each op: where it was replayed in the backlog.
    ordinary_before, seen = {}, 0
    for tag in applied:
        ordinary_before[tag] = seen
        seen += tag.startswith("o")
    last_critical = max(ordinary_before[f"c{seq}"] for seq in range(CRITICAL_OWN))
    print(f"\nprefetch multiplier {prefetch}: {ordinary_tasks} ordinary and {critical_tasks} critical tasks queued; "
          f"last critical op applied after {last_critical} of {ORDINARY} ordinary ops "
          f"({100 * last_critical / ORDINARY:.1f}%); drain {drained:.1f} s with worker start")
    assert last_critical < ORDINARY // 2, "critical ops waited behind half the ordinary backlog"
    # Per-key order: every list holds its key's tags as published, the mixed keys' critical ops last.
    wrong = {key: got for key, got in lists.items() if got != per_key[key]}
    assert not wrong, f"keys out of publish order: {sorted(wrong)[:5]}"
    first_sticky = min(ordinary_before[f"m{seq}"] for seq in range(MIXED_KEYS * MIXED_CRITICAL))
    assert first_sticky > last_critical, "a critical op of a key with ordinary ops in flight went ahead of them"
    assert stack.dlq_is_empty()
    # Started with -Q naming the replay queue alone: the critical one was added by install()'s boot step.
    assert stack.worker_log_count(rf"consuming queue-{stack.name}\.critical too") == 1


@pytest.mark.parametrize("prefetch", [4, 1])
def test_critical_ops_arriving_mid_drain_wait_for_the_tasks_workers_prefetched(
    make_loop: Callable[..., LoopStack], prefetch: int
) -> None:
    """Batches of 1000 (the default) and two worker processes, as deployed; critical ops come mid-drain.

    What a worker prefetched (``prefetch multiplier x concurrency`` tasks) is replayed
    before anything that reaches Celery after it: this prints, per multiplier, how many
    ordinary ops were applied between the critical ops' publish and the last of them.
    """
    batch, concurrency = 1000, 2
    stack = make_loop(extra_env={"CRR_HIGH_WATER": "0", "CRR_PREFETCH": str(prefetch), "CRR_BATCH_SIZE": str(batch)})
    # A slower drain (the hand-over of the critical ops takes some 0.3 s): SETs of keys of
    # each op's own (a write stamp never lets an op overwrite a newer write, and two
    # processes replay batches out of order).
    backlog = [_logged(f"ordinary:{seq % ORDINARY_KEYS}", f"o{seq}",
                       tuple(ops.set(f"padding:{seq}:{i}", "x") for i in range(PADDING)))
               for seq in range(ORDINARY)]
    critical = [_logged(f"critical:{seq % 50}", f"c{seq}").with_priority("critical") for seq in range(CRITICAL_OWN)]
    bridge = stack.start_bridge()
    stack.wait_assigned(bridge)
    stack.publish_all(backlog)
    stack.wait_for(lambda: _queued(stack)[0] >= ORDINARY // batch, 60, "the backlog handed to Celery")
    stack.start_worker(concurrency=concurrency)
    with stack.client() as r:
        stack.wait_for(lambda: r.llen("applied") >= 2 * batch, 60, "the drain under way")
        stack.publish_all(critical)
        at_publish = r.llen("applied")
        stack.wait_for(lambda: r.llen("applied") >= ORDINARY + CRITICAL_OWN, 120, "every op applied")
        applied = [tag.decode() for tag in r.lrange("applied", 0, -1)]
    last_critical = max(applied.index(f"c{seq}") for seq in range(CRITICAL_OWN))
    ahead = sum(1 for tag in applied[at_publish:last_critical] if tag.startswith("o"))
    print(f"\nprefetch multiplier {prefetch}, concurrency {concurrency}, batches of {batch}: {ahead} ordinary ops "
          f"applied between the critical ops' publish and the last of them ({ORDINARY - at_publish} were left)")
    assert ahead < ORDINARY - at_publish, "critical ops waited for the whole backlog"
