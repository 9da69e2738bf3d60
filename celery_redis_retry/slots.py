"""Redis Cluster slots of an op's keys: which ops can run atomically, and where markers live.

An op that must run as one atomic step (a command, a transaction, a script, anything
with a guard) needs all its keys in one hash slot, as Redis Cluster itself requires for
MULTI/EXEC and Lua. Such ops are refused when they are captured for a cluster target,
with a clear error, rather than failing at 3 a.m. with CROSSSLOT. A non-transactional
pipeline may span slots: it is replayed as one atomic step per slot.

Pure functions over bytes; no I/O.
"""

from __future__ import annotations

from redis.crc import key_slot

from celery_redis_retry.errors import CrossSlotError
from celery_redis_retry.ops import Arg, RedisOp


def to_bytes(value: Arg) -> bytes:
    """The bytes redis-py sends for ``value`` (str as UTF-8, numbers as their repr)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return repr(value).encode()


def slot_of(key: Arg) -> int:
    """The Redis Cluster hash slot of ``key``."""
    return key_slot(to_bytes(key))


def hash_tag(key: bytes) -> bytes:
    """The part of ``key`` Redis Cluster hashes: the ``{tag}`` if any, else the whole key."""
    start = key.find(b"{")
    if start > -1:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


_slot_tags: dict[int, bytes] = {}


def tag_for_slot(slot: int) -> bytes:
    """A short string hashing to ``slot``: the tag of a key whose own cannot go inside braces."""
    # For keys whose own tag contains "}" (or is empty). Found once per slot (~16k CRCs).
    tag = _slot_tags.get(slot)
    if tag is None:
        n = 0
        while key_slot(str(n).encode()) != slot:
            n += 1
        tag = _slot_tags[slot] = str(n).encode()
    return tag


def brace_tag(key: bytes) -> bytes:
    """What to put between braces so that a key of ours lands in ``key``'s cluster slot."""
    tag = hash_tag(key)
    if b"}" in tag or not tag:
        tag = tag_for_slot(key_slot(key))
    return tag


def marker_key(op: RedisOp, anchor: Arg | None = None, part: int | None = None) -> bytes:
    """The dedupe marker of ``op`` (or of one slot group of it), in the slot of ``anchor``.

    ``anchor`` defaults to the op's first key. The marker carries the anchor's hash tag,
    so a Lua step touching the op's keys and its marker stays inside one slot.
    """
    return marker_for(op.id, op.first_key if anchor is None else anchor, part)


def marker_for(op_id: str, anchor: Arg | None, part: int | None = None) -> bytes:
    """The dedupe marker of the op ``op_id`` in the slot of ``anchor`` (see :func:`marker_key`)."""
    tag = b"-" if anchor is None else brace_tag(to_bytes(anchor))
    suffix = b"" if part is None else b":" + str(part).encode()
    return b"crr:{" + tag + b"}:applied:" + op_id.encode() + suffix


def guarded_keys(op: RedisOp) -> list[Arg]:
    """Every key an atomic replay of ``op`` touches: its own keys and its guard's key."""
    keys = op.all_keys()
    if op.guard is not None:
        keys.append(op.guard.key)
    return keys


def check_single_slot(op: RedisOp) -> None:
    """Refuse an op that must run atomically but whose keys span cluster slots.

    Non-transactional pipelines without a guard are allowed: they run per slot.
    Raises :class:`~celery_redis_retry.errors.CrossSlotError`.
    """
    if op.kind == "pipeline" and not op.transaction and op.guard is None:
        return
    slots = {slot_of(k) for k in guarded_keys(op)}
    if len(slots) > 1:
        what = "transaction" if op.kind == "pipeline" else op.kind
        raise CrossSlotError(
            f"op {op.id}: this {what} touches keys in {len(slots)} Redis Cluster slots and cannot run atomically "
            "on a cluster target; put its keys under one hash tag (e.g. 'user:{42}:name', 'user:{42}:email')"
        )


def group_by_slot(commands: tuple[tuple[Arg, ...], ...], keys_of: list[list[Arg]]) -> list[list[int]]:
    """Indexes of ``commands`` grouped by the slot of their keys, in first-seen order.

    ``keys_of[i]`` are the keys of command ``i``. A command whose own keys span slots
    cannot be grouped: :class:`CrossSlotError`.
    """
    groups: dict[int, list[int]] = {}
    for index, keys in enumerate(keys_of):
        slots = {slot_of(k) for k in keys}
        if len(slots) > 1:
            raise CrossSlotError(f"command {index} ({commands[index][0]!s}) spans {len(slots)} cluster slots")
        groups.setdefault(slots.pop() if slots else 0, []).append(index)
    return list(groups.values())
