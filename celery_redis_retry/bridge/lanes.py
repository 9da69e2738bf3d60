"""Which Celery lane each op goes in: critical ops ahead of ordinary ones, one key's ops in order.

The bridge hands ops to Celery in two lanes: the replay queue (``redis_retry_queue``) and
the critical queue (``redis_retry_critical_queue``), which workers take from alongside it.
An op's lane is its priority (a run-time rule's first, else the op's own), with one
exception that keeps the ops of one key in order: while an earlier op of the same key
(target and first Redis key: the Kafka message key) has not ended, a later one goes in
that op's lane, behind it ("sticky lane"), whatever its own priority.

What is kept: the last lane and position per key, one dict lookup and one store per op.
An entry is only looked at again when a later op of its key wants the other lane; it is
dropped then, or by :meth:`Lanes.forget_ended`, once its op ended. Keeping one longer is
safe: it only costs a later op its priority, never its order.
"""

from __future__ import annotations

from collections.abc import Callable

from celery_redis_retry.ops import CRITICAL, RedisOp

__all__ = ["CRITICAL", "ORDINARY", "IsOpen", "Lanes", "PriorityRule", "no_rule"]

#: The ordinary lane (the replay queue); the critical one is :data:`CRITICAL`.
ORDINARY: str | None = None
#: Whether the op read at (topic, partition, offset) has not ended yet.
IsOpen = Callable[[str, int, int], bool]
#: A run-time rule: an op's priority (``"critical"``), or None to leave the op's own.
PriorityRule = Callable[[RedisOp], "str | None"]


def no_rule(op: RedisOp) -> str | None:
    """The default rule: every op keeps its own priority."""
    return None


class Lanes:
    """Decides each op's lane, keeping the ops of one key in one lane while any is in flight.

    ``is_open`` answers for a position the bridge read: True while the op there has not
    ended (read, or handed over and not reported ended). ``rule`` is the run-time
    priority rule; its answer beats the op's own.
    """

    def __init__(self, is_open: IsOpen, rule: PriorityRule = no_rule) -> None:
        self._is_open = is_open
        self._rule = rule
        #: Message key -> (lane, topic, partition, offset) of the last op of that key given a lane.
        self._last: dict[bytes, tuple[str | None, str, int, int]] = {}

    def lane(self, key: bytes, op: RedisOp, topic: str, partition: int, offset: int) -> str | None:
        """The lane of ``op`` (read at ``topic``/``partition``/``offset``, its Kafka message key ``key``)."""
        ruled = self._rule(op)  # the rule's priority beats the op's own; "ordinary" is the ordinary lane
        wanted = op.priority if ruled is None else (CRITICAL if ruled == CRITICAL else ORDINARY)
        last = self._last.get(key)
        if last is not None and last[0] != wanted and self._is_open(last[1], last[2], last[3]):
            wanted = last[0]  # behind the earlier op of its key: same lane, so never ahead of it
        self._last[key] = (wanted, topic, partition, offset)
        return wanted

    def forget_ended(self) -> int:
        """Drop the entries whose op ended; return how many are left."""
        is_open = self._is_open
        ended = [key for key, (_, topic, partition, offset) in self._last.items()
                 if not is_open(topic, partition, offset)]
        for key in ended:
            del self._last[key]
        return len(self._last)

    def __len__(self) -> int:
        return len(self._last)
