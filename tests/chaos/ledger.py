"""The ledger: what the publishing app meant to write and what it knows it captured.

One text file, appended to with single ``write()`` calls on an ``O_APPEND`` descriptor, so
every line written before a SIGKILL of the app is kept (the kernel has it). Lines:

``I <i> <op id> <created_at>``  write ``i`` is about to be published (op id ``-`` for an
                                ``app`` write, which only gets an op if it is captured)
``C <i> <op id>``               the wrapped client captured ``app`` write ``i`` as this op
``A <i>``                       ``app`` write ``i`` returned (applied at once, or captured)
``D <i> <first>``               writes ``first`` to ``i`` (one batch of this app process) are
                                durable: Kafka acknowledged them or they are committed in the
                                app's spool (the app flushed)

A write with an ``I`` line and no ``D`` line covering it was in flight when the app died:
it may have been captured or not, so it may end applied once or not at all (never twice).
A ``D`` line names its batch's first write because a restarted app goes on after every
write ever intended: "every write up to ``i``" would also cover the writes its killed
predecessor left in flight.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


class LedgerWriter:
    """Appends ledger lines; each line is one ``write()``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def line(self, *parts: object) -> None:
        os.write(self._fd, (" ".join(str(p) for p in parts) + "\n").encode())

    def close(self) -> None:
        os.close(self._fd)


@dataclass
class Ledger:
    """The ledger as read back: per write index, what is known of it."""

    intended: dict[int, str] = field(default_factory=dict)  # index -> op id ("-" for app writes)
    created_at: dict[int, float] = field(default_factory=dict)
    captured: dict[int, str] = field(default_factory=dict)  # app writes captured: index -> op id
    returned: set[int] = field(default_factory=set)  # app writes that returned
    durable: set[int] = field(default_factory=set)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Ledger:
        ledger = cls()
        text = Path(path).read_text() if Path(path).exists() else ""
        for line in text.splitlines():
            parts = line.split()
            if not parts or (parts[0] == "I" and len(parts) < 4):
                continue  # a line cut by a SIGKILL mid-write cannot happen (one write), but be safe
            kind, index = parts[0], int(parts[1])
            if kind == "I":
                ledger.intended[index] = parts[2]
                ledger.created_at[index] = float(parts[3])
            elif kind == "C":
                ledger.captured[index] = parts[2]
            elif kind == "A":
                ledger.returned.add(index)
            elif kind == "D":
                ledger.durable.update(range(int(parts[2]), index + 1))
        return ledger

    @property
    def next_index(self) -> int:
        """Where a restarted app goes on: after every write ever intended."""
        return max(self.intended, default=-1) + 1

    def certain(self, index: int) -> bool:
        """Whether write ``index`` surely happened: durable, or an ``app`` write that applied at once."""
        return index in self.durable or (index in self.returned and index not in self.captured)

    def op_ids(self) -> dict[str, int]:
        """Op id -> write index, for every op the app built or captured."""
        ids = {op_id: i for i, op_id in self.intended.items() if op_id != "-"}
        ids.update({op_id: i for i, op_id in self.captured.items()})
        return ids
