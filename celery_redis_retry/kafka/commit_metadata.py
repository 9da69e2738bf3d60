"""The offsets a commit's metadata lists, as compact ranges (``"12,15-17"``).

The bridge commits a partition's offset up to its first op that has not ended and lists,
in the commit's metadata, the ended ops beyond it; the DLQ tools list the records dealt
with beyond their cursor the same way. Kafka caps the metadata (:data:`MAX_METADATA`).
"""

from __future__ import annotations

from collections.abc import Iterable

#: Kafka brokers keep commit metadata up to ``offset.metadata.max.bytes`` (4096 by default).
MAX_METADATA = 4000


def format_offsets(offsets: Iterable[int], *, truncate: bool = False) -> str:
    """Offsets as ranges, ``{12, 15, 16, 17}`` -> ``"12,15-17"``, for a commit's metadata.

    Past :data:`MAX_METADATA` characters (the broker would refuse it) :class:`ValueError`,
    or with ``truncate`` the highest ranges are left out.
    """
    ranges: list[list[int]] = []
    for offset in sorted(offsets):
        if ranges and offset == ranges[-1][1] + 1:
            ranges[-1][1] = offset
        else:
            ranges.append([offset, offset])
    parts = [str(a) if a == b else f"{a}-{b}" for a, b in ranges]
    text = ",".join(parts)
    if len(text) > MAX_METADATA:
        if not truncate:
            raise ValueError(
                f"{len(ranges)} separate runs of handled records past the oldest pending one: too many to remember; "
                "replay or purge the oldest pending records first"
            )
        kept, size = [], 0
        for part in parts:
            size += len(part) + 1
            if size > MAX_METADATA:
                break
            kept.append(part)
        text = ",".join(kept)
    return text


def parse_offsets(text: str | None) -> frozenset[int]:
    """The offsets of :func:`format_offsets`' text (empty for None, ``""`` or text it did not write)."""
    offsets: set[int] = set()
    try:
        for part in (text or "").split(","):
            if part:
                first, _, last = part.partition("-")
                offsets.update(range(int(first), int(last or first) + 1))
    except ValueError:
        return frozenset()
    return frozenset(offsets)
