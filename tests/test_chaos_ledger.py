"""The chaos ledger's reading: which writes the app knows are durable, across an app restart."""

from __future__ import annotations

from pathlib import Path

from chaos.ledger import Ledger


def test_a_restarted_apps_batch_does_not_vouch_for_its_killed_predecessors_writes(tmp_path: Path) -> None:
    path = tmp_path / "ledger.txt"
    path.write_text(
        "I 0 a-1 1.0\nI 1 a-2 1.0\nD 1 0\n"  # first process: a durable batch
        "I 2 a-3 2.0\nI 3 - 2.0\nA 3\n"  # ...then SIGKILLed mid-batch
        "I 4 b-1 3.0\nI 5 b-2 3.0\nD 5 4\n"  # the restarted app goes on after every intended write
    )
    ledger = Ledger.read(path)
    assert [i for i in range(6) if ledger.certain(i)] == [0, 1, 3, 4, 5]  # 3: an app write that applied at once
    assert not ledger.certain(2), "a write in flight when the app died is not durable"
    assert ledger.next_index == 6
