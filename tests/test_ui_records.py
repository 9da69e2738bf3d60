"""The operator page's view of DLQ records: redaction, filters, newest first, paging (pure units)."""

from __future__ import annotations

import json

import click
import pytest

from celery_redis_retry import ops
from celery_redis_retry.dlq.admin import StoredLetter
from celery_redis_retry.dlq.record import DeadLetter
from celery_redis_retry.message import dumps
from celery_redis_retry.ui.records import detail, filtered, page_of, redacted_op, summary


def _stored(offset: int, op: ops.RedisOp | None, *, reason: str = "wrong_type", outcome: str = "dead",
            at: int = 0) -> StoredLetter:
    return StoredLetter(0, offset, at or 1000 + offset, DeadLetter(outcome, reason, op=op, attempts=1))


def test_values_are_redacted_keys_and_names_kept() -> None:
    command = redacted_op(ops.set("user:1", "secret-value"))
    assert command["cmds"] == [["SET", "user:1", "<12 bytes>"]]
    mset = redacted_op(ops.pipeline([ops.command("MSET", "a", "xx", "b", "yyy"), ops.hset("h", "field", "v")]))
    assert mset["cmds"] == [["MSET", "a", "<2 bytes>", "b", "<3 bytes>"], ["HSET", "h", "<5 bytes>", "<1 bytes>"]]
    script = redacted_op(ops.script("bump", keys=["k1"], args=["hidden"]))
    assert list(script["keys"]) == ["k1"]
    assert script["args"] == ["<6 bytes>"]


def test_detail_shows_values_only_when_asked() -> None:
    stored = _stored(1, ops.set("user:1", "secret-value"))
    assert "secret-value" not in dumps(detail(stored, values=False)).decode()
    assert "secret-value" in dumps(detail(stored, values=True)).decode()
    row = summary(stored)
    assert row["op"] == "SET user:1"
    assert "secret" not in json.dumps(row)


def test_filters_and_pages_newest_first() -> None:
    records = [_stored(i, ops.set(f"k{i}", i), reason="wrong_type" if i % 2 else "invalid_value") for i in range(7)]
    targets = ["default"]
    assert [s.offset for s in filtered(records, {"reason": "wrong_type"}, targets=targets)] == [1, 3, 5]
    assert len(filtered(records, {"reason": "", "outcome": "dead"}, targets=targets)) == 7
    assert filtered(records, {"outcome": "rejected"}, targets=targets) == []
    # The filters of `dlq list`, with its rules and its errors.
    assert [s.offset for s in filtered(records, {"key": "k[12]", "command": "set"}, targets=targets)] == [1, 2]
    assert filtered(records, {"command": "INCRBY"}, targets=targets) == []
    with pytest.raises(click.BadParameter, match="'nope' is no target in redis_retry_targets"):
        filtered(records, {"target": "nope"}, targets=targets)
    first = page_of(records, page=0, size=3)
    assert first["total"] == 7
    assert [r["ref"] for r in first["records"]] == ["0:6", "0:5", "0:4"]
    assert [r["ref"] for r in page_of(records, page=2, size=3)["records"]] == ["0:0"]
