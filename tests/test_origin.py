"""An op's origin (dlq.record.Origin) and its forms in Celery task arguments.

Bridges and workers of two releases run side by side during an upgrade, and tasks wait
in the Celery broker across it: the arguments must read the same both ways. The shapes
below are those the previous release sent (its dispatch.py and tasks.py): ``replay``
takes ``origin`` as an object, ``replay_batch`` takes its origins as lists (which double
as positions when its third argument is ``"origins"``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery
from loop_stack import LoopStack

from celery_redis_retry import message
from celery_redis_retry import ops as builders
from celery_redis_retry.bridge.dispatch import TaskSender
from celery_redis_retry.bridge.offsets import Consumed
from celery_redis_retry.dlq.record import DeadLetter, Origin, decode_record
from celery_redis_retry.names import AT_ORIGINS, DEAD_LETTER_TASK, REPLAY_BATCH_TASK, REPLAY_TASK
from celery_redis_retry.replay.tasks import _positions, position_of

#: What the previous release's bridge and worker put in task arguments, exactly.
PREVIOUS_REPLAY_KWARGS = {"origin": {"topic": "ops", "partition": 3, "offset": 41}, "position": ["ops", 3, 41]}
PREVIOUS_RETRY_KWARGS = {"origin": {"topic": "ops", "partition": 3, "offset": 41}, "outages": 1, "position": None}
PREVIOUS_BATCH_ORIGINS = [["ops", 3, 41], ["ops", 0, 7]]


def test_both_wire_forms_read_as_one_origin() -> None:
    expected = Origin("ops", 3, 41)
    assert Origin.from_wire(PREVIOUS_REPLAY_KWARGS["origin"]) == expected
    assert Origin.from_wire(PREVIOUS_RETRY_KWARGS["origin"]) == expected
    assert Origin.from_wire(PREVIOUS_BATCH_ORIGINS[0]) == expected
    assert Origin.from_wire(("ops", 3, 41)) == expected  # a position tuple, as the waiting topics keep it
    assert Origin.from_wire(None) is None


def test_an_origin_writes_both_forms_of_the_previous_release() -> None:
    origin = Origin("ops", 3, 41)
    assert origin.to_wire() == PREVIOUS_BATCH_ORIGINS[0]
    assert origin.to_document() == PREVIOUS_REPLAY_KWARGS["origin"]
    assert Origin.from_wire(origin.to_wire()) == Origin.from_wire(origin.to_document()) == origin


@pytest.mark.parametrize(
    "value",
    [["ops", 3], ["ops", "3", 41], {"topic": "ops", "partition": 3}, {"topic": 1, "partition": 3, "offset": 4},
     ["ops", 3, 41.0], ["ops", True, 41], "ops:3:41"],
)
def test_a_malformed_origin_is_refused_naming_the_forms(value: Any) -> None:
    with pytest.raises(ValueError, match=r"must be \[topic, partition, offset\]"):
        Origin.from_wire(value)


def test_batch_origins_serve_as_positions_as_before() -> None:
    positions = [position_of(p) for p in _positions(AT_ORIGINS, PREVIOUS_BATCH_ORIGINS)]
    assert positions == [("ops", 3, 41), ("ops", 0, 7)]


def test_a_dead_letter_keeps_the_origin_as_an_object() -> None:
    letter = DeadLetter.for_error(ValueError("x"), op=builders.set("k", "v"), raw=b"", origin=Origin("ops", 3, 41))
    assert letter.document()["origin"] == {"topic": "ops", "partition": 3, "offset": 41}
    assert decode_record(message.dumps(letter.document())).origin == Origin("ops", 3, 41)


# -- what the bridge puts in a real Celery broker ------------------------------------------


@pytest.fixture
def app() -> Iterator[Celery]:
    celery = Celery("origin-wire", broker="memory://", set_as_current=False)
    yield celery
    celery.close()


def sent(app: Celery, *, one_task_per_op: bool, items: list[Consumed]) -> list[tuple[str, Any, Any]]:
    """(task name, args, kwargs) of each task a TaskSender publishes for ``items``, read back from the broker."""
    TaskSender(app, "retry-q", one_task_per_op=one_task_per_op, with_positions=True).send([items])
    found = []
    with app.connection_for_read() as connection, connection.SimpleQueue("retry-q") as queue:
        while queue.qsize():
            received = queue.get(timeout=1)
            args, kwargs, _ = received.decode()
            found.append((received.headers["task"], args, kwargs))
            received.ack()
    return found


def consumed(offset: int, first_origin: tuple[str, int, int] | None = None) -> Consumed:
    op = builders.set("k", "v")
    return Consumed("ops", 3, offset, message.encode(op).decode(), op, first_origin)


def test_the_bridge_sends_replay_the_origin_object_of_the_previous_release(app: Celery) -> None:
    [(name, args, kwargs)] = sent(app, one_task_per_op=True, items=[consumed(41)])
    assert name == REPLAY_TASK
    assert len(args) == 1
    assert kwargs == PREVIOUS_REPLAY_KWARGS


def test_the_bridge_sends_replay_batch_the_origin_lists_of_the_previous_release(app: Celery) -> None:
    [(name, args, kwargs)] = sent(app, one_task_per_op=False, items=[consumed(41), consumed(42)])
    assert name == REPLAY_BATCH_TASK
    assert args[1:] == [[["ops", 3, 41], ["ops", 3, 42]], AT_ORIGINS]
    assert kwargs == {}


def test_a_parked_op_travels_with_its_first_origin(app: Celery) -> None:
    parked = Consumed("ops.waiting.default", 0, 5, consumed(0).message, consumed(0).op, ("ops", 3, 41))
    [(_, args, _)] = sent(app, one_task_per_op=False, items=[parked])
    assert args[1:] == [[["ops", 3, 41]], [["ops.waiting.default", 0, 5]]]
    [(_, _, kwargs)] = sent(app, one_task_per_op=True, items=[parked])
    assert kwargs == {"origin": PREVIOUS_REPLAY_KWARGS["origin"], "position": ["ops.waiting.default", 0, 5]}


# -- what a real worker of this release does with the previous release's tasks -------------


@pytest.mark.slow
def test_a_worker_runs_and_dead_letters_tasks_in_the_previous_release_shapes(
    make_loop: Callable[..., LoopStack],
) -> None:
    stack = make_loop()
    stack.start_worker(concurrency=1)
    client = Celery("previous-bridge", broker=stack.broker_url, set_as_current=False)
    errback = client.signature(DEAD_LETTER_TASK)
    applied, refused = builders.set("single", "1"), builders.set("k", "v").with_target("elsewhere")
    in_batch, refused_in_batch = builders.set("batched", "2"), builders.script("never-registered", keys=["k"])
    # Celery's app.close() leaves its pooled connections to the garbage collector: the
    # tasks go out on a connection of their own, closed when sent.
    with client.connection_for_write() as connection:
        for op, offset in ((applied, 1), (refused, 2)):
            client.send_task(REPLAY_TASK, args=(message.encode(op).decode(),), queue=f"queue-{stack.name}",
                             kwargs={"origin": {"topic": "ops", "partition": 3, "offset": offset}},
                             link_error=errback, connection=connection)
        client.send_task(
            REPLAY_BATCH_TASK, queue=f"queue-{stack.name}", link_error=errback, connection=connection,
            args=([message.encode(in_batch).decode(), message.encode(refused_in_batch).decode()],
                  [["ops", 0, 7], ["ops", 0, 8]]),
        )
    with stack.client() as r:
        stack.wait_for(lambda: r.get("single") == b"1" and r.get("batched") == b"2", 60, "both valid ops applied")
    letters = {d.op_id: d for d in stack.dead_letters(count=2)}
    assert letters[refused.id].reason == "unknown_target"
    assert letters[refused.id].origin == Origin("ops", 3, 2)
    assert letters[refused_in_batch.id].reason == "unknown_script"
    assert letters[refused_in_batch.id].origin == Origin("ops", 0, 8)
    client.close()
