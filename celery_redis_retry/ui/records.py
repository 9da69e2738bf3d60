"""DLQ records as the operator page shows them: filtered, newest first, paged, values redacted.

Values of Redis commands (anything that is not a command name or a key) are replaced by
``<n bytes>`` unless the operator asks for them: a page left open on a screen should not
show the data of the application.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from celery_redis_retry.dlq.admin import StoredLetter, describe_op
from celery_redis_retry.dlq.filters import DlqFilter, select
from celery_redis_retry.message import op_document
from celery_redis_retry.ops import RedisOp
from celery_redis_retry.redis_commands import COMMANDS
from celery_redis_retry.slots import to_bytes


def filtered(records: Sequence[StoredLetter], filters: dict[str, str], *, targets: Sequence[str],
             scripts: Sequence[str] = ()) -> list[StoredLetter]:
    """The records that match the page's filters: the filters of ``dlq list``, same rules.

    ``filters`` holds the query parameters of the page; empty ones are no filter.
    :class:`click.BadParameter` names a bad one (the page answers 400 with it).
    """
    def given(name: str) -> str | None:
        return filters.get(name) or None

    op_id = given("op_id")
    where = DlqFilter.from_options(
        targets=targets, scripts=scripts, reason=given("reason"), outcome=given("outcome"), command=given("command"),
        target=given("target"), key=given("key"), older_than=given("older_than"), newer_than=given("newer_than"),
        op_ids=(op_id,) if op_id else (),
    )
    return select(records, where=where).chosen


def page_of(records: Sequence[StoredLetter], *, page: int, size: int) -> dict[str, Any]:
    """One page of ``records``, newest first, each as a summary row."""
    newest_first = sorted(records, key=lambda s: (s.timestamp_ms, s.partition, s.offset), reverse=True)
    rows = newest_first[page * size:(page + 1) * size]
    return {"total": len(records), "page": page, "size": size, "records": [summary(s) for s in rows]}


def summary(stored: StoredLetter) -> dict[str, Any]:
    """A row of the list: where, when, why, and the op's command and key (no values)."""
    letter = stored.letter
    return {
        "ref": stored.ref,
        "timestamp_ms": stored.timestamp_ms,
        "state": stored.state,
        "outcome": letter.outcome if letter is not None else None,
        "reason": letter.reason if letter is not None else "undecodable",
        "attempts": letter.attempts if letter is not None else None,
        "op_id": stored.op_id,
        "op": describe_op(_redacted_copy(letter.op) if letter is not None and letter.op else None),
    }


def detail(stored: StoredLetter, *, values: bool) -> dict[str, Any]:
    """The whole record; the op's values redacted unless ``values``."""
    document = stored.document()
    letter = stored.letter
    if not values and letter is not None:
        if letter.op is not None:
            document["op"] = redacted_op(letter.op)
        if document.get("raw") is not None:
            document["raw"] = _size(document["raw"])
    document["values_shown"] = values
    return document


def redacted_op(op: RedisOp) -> dict[str, Any]:
    """The op's wire document with every value replaced by ``<n bytes>`` (names and keys kept)."""
    document = op_document(op)
    if op.kind == "script":
        document["args"] = [_size(a) for a in op.args]
    else:
        document["cmds"] = [_redacted_command(command) for command in op.commands]
    if "guard" in document:
        document["guard"] = {name: _size(value) for name, value in document["guard"].items()}
    return document


def _redacted_copy(op: RedisOp) -> RedisOp:
    """The op with its values redacted, for :func:`describe_op` (which shows a command's first two items)."""
    import msgspec

    if op.kind == "script":
        return op
    return msgspec.structs.replace(op, commands=tuple(tuple(_redacted_command(c)) for c in op.commands))


def _redacted_command(command: Sequence[Any]) -> list[Any]:
    name = command[0]
    spec = COMMANDS.get(str(name.decode() if isinstance(name, bytes) else name).upper())
    keys = set(spec.key_positions(len(command))) if spec is not None else set()
    return [_text(arg) if i == 0 or i in keys else _size(arg) for i, arg in enumerate(command)]


def _text(value: Any) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)


def _size(value: Any) -> str:
    return f"<{len(to_bytes(value)) if isinstance(value, (bytes, str, int, float)) else len(str(value))} bytes>"
