"""Which offsets are safe to commit: per partition, what became of every op read.

Batches of different targets fill at different speeds, so a partition's offsets are
not handed over in order, and ops end in any order. :class:`OffsetTracker` keeps, per
partition, what became of each offset read, and only ever allows committing up to the
first op that has not ended: a committed offset never passes an op that may still need
Kafka's copy. It also knows which ops in flight are overdue (handed over and neither
ended nor reported retrying within the redelivery timeout), for the bridge to hand
them over again.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from celery_redis_retry.kafka import format_offsets
from celery_redis_retry.ops import RedisOp

#: Where an op is: read and not handed over yet, or ended. An op handed to Celery and not
#: ended is in flight: its state is then what the tracker keeps of it (a :data:`_Flight`).
CONSUMED, ENDED = 0, 2

Partition = tuple[str, int]


@dataclass(frozen=True)
class Consumed:
    """One valid op read from Kafka, waiting to be handed to Celery."""

    topic: str
    partition: int
    offset: int
    message: str  # the op's wire bytes as text, exactly as read
    op: RedisOp = field(compare=False)
    #: Where a parked op was first read (the retry topic), when it was read from a waiting topic.
    first_origin: tuple[str, int, int] | None = None
    #: Its Celery lane: None (the replay queue) or "critical" (see bridge/lanes.py).
    lane: str | None = None

    @property
    def op_id(self) -> str:
        return self.op.id

    @property
    def first_position(self) -> tuple[str, int, int]:
        """Where it was first read: the retry topic, even when read now from a waiting topic."""
        return self.first_origin or (self.topic, self.partition, self.offset)

    @property
    def position(self) -> list[str | int]:
        """Where the bridge read it (a waiting topic, for a parked op), as the replay tasks receive it."""
        return [self.topic, self.partition, self.offset]

    @property
    def origin(self) -> list[str | int]:
        """Where it came from, as ``replay_batch`` receives it: :meth:`Origin.to_wire` of its first position.

        Built here without an :class:`Origin` per op: the batches are the bridge's hot path.
        """
        first = self.first_origin
        return [self.topic, self.partition, self.offset] if first is None else list(first)


#: A hand-over not ended waits up to this many redelivery timeouts before the next (doubling each time).
MAX_REDELIVERY_BACKOFF = 8


@dataclass(frozen=True)
class InFlight:
    """An op handed to Celery that has not ended: where to read it again from Kafka to hand it over again."""

    topic: str
    partition: int
    offset: int
    first_origin: tuple[str, int, int] | None
    #: Hand-overs so far that did not end.
    handovers: int


# What the tracker keeps of an op in flight:
# (first_origin, due, handovers, sent_mark, retrying_since).
# A plain tuple of numbers, on purpose: CPython stops tracking such tuples at their first
# garbage collection, so 100,000 ops in flight add nothing to the full collections that a
# Consumed (and its decoded op) per op made cost about 40% of the bridge's CPU time during
# a drain. Not the op's message: Kafka holds it until the op ends (that is what committing
# after end is for), and an op handed over again is read from there
# (:mod:`celery_redis_retry.bridge.refetch`). Kept here, the messages were about 60% of
# the bridge's growth in memory during a drain (some 440 bytes per op in flight).
_Flight = tuple[tuple[str, int, int] | None, float, int, int, float]


class _Log:
    """One partition's offsets read and not yet committed past, in the order read."""

    __slots__ = ("ended_before", "ended_past_head", "order", "safe", "state")

    def __init__(self) -> None:
        self.order: deque[int] = deque()
        #: CONSUMED, ENDED, or the op's _Flight while in flight: one dict entry per offset read.
        self.state: dict[int, int | _Flight] = {}
        self.ended_past_head = 0  # ENDED offsets in ``order`` behind one that has not ended
        self.ended_before: set[int] = set()  # from the commit's metadata
        self.safe: int | None = None  # the committable offset, once known

    def flights(self) -> Iterator[tuple[int, _Flight]]:
        """The ops in flight: offset and what is kept of each."""
        return ((offset, state) for offset, state in self.state.items() if type(state) is tuple)


class OffsetTracker:
    """Per partition, what became of every offset read, and up to where it is safe to commit.

    An offset is safe once it and every offset before it *ended*. With ``hold_until_end``
    (``redis_retry_commit_after = "end"``) an op handed to Celery is only *in flight*: it
    ends when a worker reports it (:mod:`celery_redis_retry.bridge.ends`), and is handed over
    again when it has not within ``redelivery_timeout`` seconds. Without it, the hand-over
    is the end, as when Celery's broker is trusted with the only copy. Ops the bridge ends
    itself (expired, rejected, parked in a waiting topic) end at once either way.

    A partition rewound to its first op not handed over reads again ops that are in
    flight or ended already: :meth:`consumed` says to skip those.
    """

    def __init__(self, *, hold_until_end: bool = False, redelivery_timeout: float = 300.0) -> None:
        self.hold_until_end = hold_until_end
        self.redelivery_timeout = redelivery_timeout
        self._logs: dict[Partition, _Log] = {}
        self._earliest_due = float("inf")  # no op in flight is due before this
        self._last_flight: _Flight | None = None  # shared by the ops of one hand-over (see handed_over)
        self.in_flight = 0
        #: Ops in flight that a worker scheduled again with a countdown (a retry), not ended since.
        self.retrying_ops = 0

    def _log(self, topic: str, partition: int) -> _Log:
        log = self._logs.get((topic, partition))
        if log is None:
            log = self._logs[(topic, partition)] = _Log()
        return log

    def assigned(self, topic: str, partition: int, committed: int, ended: frozenset[int]) -> None:
        """Start a partition at its committed offset, knowing which later offsets ended before."""
        self.forget(topic, partition)
        log = self._log(topic, partition)
        log.ended_before = {o for o in ended if o >= committed}
        if committed >= 0:
            log.safe = committed

    def consumed(self, topic: str, partition: int, offset: int) -> bool:
        """Note an offset read from Kafka; False when it is in flight or ended already (skip it)."""
        log = self._log(topic, partition)
        state = log.state.get(offset)
        if state is not None:
            return state == CONSUMED
        log.order.append(offset)
        if offset in log.ended_before:
            log.ended_before.discard(offset)
            log.state[offset] = ENDED
            log.ended_past_head += 1
            self._advance(log)
            return False
        log.state[offset] = CONSUMED
        return True

    def handed_over(self, topic: str, partition: int, offset: int, item: Consumed | None = None,
                    sent_mark: int = 0, *, now: float | None = None) -> int | None:
        """An op went to Celery; return the offset to store if the committable point moved.

        ``now`` (``time.monotonic()``) is read once per hand-over by a caller handing over many.

        ``sent_mark`` counts the tasks sent to the Celery queue up to and including this
        op's: once fewer tasks wait there than were sent after it, its task left the queue.
        """
        log = self._logs.get((topic, partition))
        state = None if log is None else log.state.get(offset)
        if log is None or state is None or state == ENDED:
            return None  # the partition was revoked meanwhile, or its end came first
        if not self.hold_until_end or item is None:
            return self.ended(topic, partition, offset)
        previous = state if type(state) is tuple else None
        handovers = 1 if previous is None else previous[2] + 1  # [2]: its hand-overs so far
        if previous is not None and previous[4]:
            self.retrying_ops -= 1  # a new hand-over: no longer known to wait for a retry
        if state == CONSUMED:
            self.in_flight += 1
        # Each hand-over that did not end waits twice as long for the next: ops no worker
        # can end (workers away, an ends topic they cannot write) do not flood the queue.
        backoff = min(2 ** (handovers - 1), MAX_REDELIVERY_BACKOFF)
        due = (time.monotonic() if now is None else now) + self.redelivery_timeout * backoff
        log.state[offset] = self._flight(item.first_origin, due, handovers, sent_mark)
        self._earliest_due = min(self._earliest_due, due)
        return None

    def _flight(self, first_origin: tuple[str, int, int] | None, due: float, handovers: int,
                sent_mark: int) -> _Flight:
        """What to keep of an op in flight: the tuple of the op before when only ``due`` differs, by microseconds.

        The ops of one hand-over share their sent mark, and their due times differ by the
        microseconds between them: one tuple serves them all, and an op in flight costs
        only its entries in the partition's dicts (about 140 bytes instead of 250).
        """
        last = self._last_flight
        if (last is not None and last[3] == sent_mark and last[2] == handovers and last[0] == first_origin
                and 0.0 <= due - last[1] < 1.0):
            return last
        self._last_flight = flight = (first_origin, due, handovers, sent_mark, 0.0)
        return flight

    def ended(self, topic: str, partition: int, offset: int) -> int | None:
        """An op ended; return the offset to store if the committable point moved."""
        return self.ended_many(topic, partition, (offset,))

    def ended_many(self, topic: str, partition: int, offsets: Iterable[int]) -> int | None:
        """Ops of one partition ended; return the offset to store if the committable point moved.

        Offsets that are not this bridge's (another bridge handed them over) or that
        ended already (reported twice) are ignored.
        """
        log = self._logs.get((topic, partition))
        if log is None:
            return None
        state = log.state
        for offset in offsets:
            was = state.get(offset)
            if was is None or was == ENDED:
                continue
            if type(was) is tuple:
                self.in_flight -= 1
                if was[4]:
                    self.retrying_ops -= 1
            state[offset] = ENDED
            log.ended_past_head += 1
        return self._advance(log)

    def retrying(self, topic: str, partition: int, offset: int, due_in: float) -> None:
        """A worker scheduled the op again ``due_in`` seconds from now: wait for that too."""
        log = self._logs.get((topic, partition))
        flight = None if log is None else log.state.get(offset)
        if log is not None and type(flight) is tuple:
            first_origin, due, handovers, sent_mark, since = flight
            now = time.monotonic()
            if not since:
                since = now
                self.retrying_ops += 1
            due = max(due, now + max(0.0, due_in) + self.redelivery_timeout)
            log.state[offset] = (first_origin, due, handovers, sent_mark, since)

    def oldest_retrying(self, now: float | None = None) -> float | None:
        """Seconds since the longest-waiting op in flight was first scheduled for a retry (None: none is)."""
        now = time.monotonic() if now is None else now
        since = min((f[4] for log in self._logs.values() for _, f in log.flights() if f[4]), default=None)
        return None if since is None else now - since

    def _advance(self, log: _Log) -> int | None:
        order, state = log.order, log.state
        safe = None
        while order and state[order[0]] == ENDED:
            offset = order.popleft()
            del state[offset]
            log.ended_past_head -= 1
            safe = offset + 1
        if safe is not None:
            log.safe = safe
        return safe

    def overdue(self, now: float | None = None, *, taken: int | None = None) -> list[InFlight]:
        """Ops in flight past their due time (to hand over again), oldest first per partition.

        With ``taken`` (tasks sent minus tasks still waiting in the Celery queue), only the
        ops whose task left the queue: one whose task may still wait there is late, not lost.
        """
        now = time.monotonic() if now is None else now
        if now < self._earliest_due:
            return []
        self._earliest_due = min((f[1] for log in self._logs.values() for _, f in log.flights()),
                                 default=float("inf"))
        return [
            InFlight(topic, partition, offset, first_origin, handovers)
            for (topic, partition), log in self._logs.items()
            for offset, (first_origin, due, handovers, sent_mark, _) in log.flights()
            if due <= now and (taken is None or sent_mark <= taken)
        ]

    def is_open(self, topic: str, partition: int, offset: int) -> bool:
        """Whether the op read at this offset has not ended (read, or in flight); False once ended or forgotten."""
        log = self._logs.get((topic, partition))
        state = None if log is None else log.state.get(offset)
        return state is not None and state != ENDED

    def first_open(self, topic: str, partition: int) -> int | None:
        """The smallest offset of the partition not handed over yet (where to rewind to)."""
        log = self._logs.get((topic, partition))
        if log is None:
            return None
        return next((o for o in log.order if log.state[o] == CONSUMED), None)

    def commit_point(self, topic: str, partition: int) -> tuple[int, str] | None:
        """The offset to commit and, as its metadata, the offsets past it that ended (None: unknown)."""
        log = self._logs.get((topic, partition))
        if log is None:
            return None
        safe = log.order[0] if log.order else log.safe
        if safe is None:
            return None
        ended = [o for o in log.order if log.state[o] == ENDED] if log.ended_past_head else []
        ended += (o for o in log.ended_before if o >= safe)
        return safe, format_offsets(ended, truncate=True)

    def forget(self, topic: str, partition: int) -> None:
        """Drop a partition's bookkeeping (revoked)."""
        log = self._logs.pop((topic, partition), None)
        if log is not None:
            flights = [f for _, f in log.flights()]
            self.in_flight -= len(flights)
            self.retrying_ops -= sum(1 for f in flights if f[4])

    def __len__(self) -> int:
        return sum(len(log.state) for log in self._logs.values())
