"""The DLQ filters and their parsing: pure functions on StoredLetter values, no processes."""

from __future__ import annotations

import click
import pytest

from celery_redis_retry import ops
from celery_redis_retry.dlq.admin import StoredLetter, republished_copy
from celery_redis_retry.dlq.filters import DlqFilter, parse_duration, select
from celery_redis_retry.dlq.record import DeadLetter
from celery_redis_retry.ops import RedisOp

NOW = 1_800_000_000.0


def _stored(op: RedisOp | None, *, reason: str = "wrong_type", age: float = 10.0, offset: int = 0,
            outcome: str = "dead") -> StoredLetter:
    letter = DeadLetter(outcome=outcome, reason=reason, op=op) if op is not None else None
    return StoredLetter(0, offset, int((NOW - age) * 1000), letter, problem=None if op else "junk")


def _filter(**options: object) -> DlqFilter:
    return DlqFilter.from_options(targets=["default", "cache"], scripts=["bump"], now=NOW, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30), ("15m", 900), ("2h", 7200), ("1d", 86400), ("1h30m", 5400), ("1.5h", 5400), (" 2H ", 7200),
])
def test_durations_read_in_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "m", "5x", "5 m", "-5m", "5m junk", "five minutes"])
def test_a_bad_duration_is_refused_naming_it_and_the_units(text: str) -> None:
    with pytest.raises(ValueError, match=r"is no duration.*s, m, h or d"):
        parse_duration(text)


def test_bad_options_are_refused_naming_the_value_and_what_is_allowed() -> None:
    with pytest.raises(click.BadParameter, match=r"'nowhere' is no target.*cache, default"):
        _filter(target="nowhere")
    with pytest.raises(click.BadParameter, match=r"'SETT' is no Redis write command.*bump"):
        _filter(command="SETT")
    with pytest.raises(click.BadParameter, match=r"'soon' is no duration"):
        _filter(older_than="soon")
    with pytest.raises(click.BadParameter, match=r"'wrong_typo' is no DLQ reason.*wrong_type"):
        _filter(reason="wrong_typo")
    with pytest.raises(click.BadParameter, match="empty key pattern"):
        _filter(key="")


def test_command_matches_any_command_of_a_pipeline_in_any_case() -> None:
    pipe = _stored(ops.pipeline([ops.set("a", 1), ops.incrby("b", 2)]))
    assert _filter(command="incrby").matches(pipe)
    assert _filter(command="SET").matches(pipe)
    assert not _filter(command="HSET").matches(pipe)


def test_command_names_a_script_by_evalsha_or_its_name() -> None:
    script = _stored(ops.script("bump", keys=["k"], args=[1]))
    assert _filter(command="evalsha").matches(script)
    assert _filter(command="BUMP").matches(script)
    assert not _filter(command="SET").matches(script)


def test_key_is_a_redis_glob_over_every_key_of_the_op() -> None:
    pipe = _stored(ops.pipeline([ops.set("user:1", 1), ops.set("order:7", 2)]))
    assert _filter(key="order:*").matches(pipe)
    assert _filter(key="user:?").matches(pipe)
    assert _filter(key="user:[0-9]").matches(pipe)
    assert not _filter(key="user:2*").matches(pipe)
    assert not _filter(key="user").matches(pipe)


def test_target_reason_and_outcome() -> None:
    cached = _stored(ops.set("k", 1).with_target("cache"), reason="retries_exhausted")
    assert _filter(target="cache").matches(cached)
    assert not _filter(target="default").matches(cached)
    assert _filter(reason="retries_exhausted", outcome="dead").matches(cached)
    assert not _filter(outcome="rejected").matches(cached)


def test_age_is_the_record_time_against_now() -> None:
    hour_old = _stored(ops.set("k", 1), age=3600)
    assert _filter(older_than="30m").matches(hour_old)
    assert not _filter(older_than="2h").matches(hour_old)
    assert _filter(newer_than="2h").matches(hour_old)
    assert not _filter(newer_than="59m").matches(hour_old)
    assert _filter(older_than="30m", newer_than="2h").matches(hour_old)


def test_criteria_combine_and_an_undecodable_record_meets_no_op_criterion() -> None:
    junk = _stored(None)
    assert _filter().matches(junk)
    assert _filter().empty
    assert not _filter(key="*").matches(junk)
    assert not _filter(command="SET").matches(junk)
    record = _stored(ops.set("user:1", 1))
    assert _filter(key="user:*", command="set", older_than="5s").matches(record)
    assert not _filter(key="user:*", command="set", older_than="1m").matches(record)


def test_a_replay_that_died_again_says_where_it_came_from() -> None:
    first = _stored(ops.incrby("n", 1), offset=4)
    again = _stored(republished_copy(first, first.letter.op), offset=9)  # type: ignore[union-attr]
    third = StoredLetter(1, 12, again.timestamp_ms, DeadLetter(
        outcome="dead", reason="wrong_type", op=republished_copy(again, again.letter.op)))  # type: ignore[union-attr]
    assert (first.replayed_from, first.replays) == (None, 0)
    assert (again.replayed_from, again.replays) == ("0:4", 1)
    assert (third.replayed_from, third.replays) == ("0:9", 2)
    assert again.document()["replayed_from"] == "0:4"
    assert _filter(replayed=True).matches(again)
    assert not _filter(replayed=True).matches(first)
    assert _filter(replayed=False).matches(first)


def test_a_broad_replay_selection_leaves_replays_out_unless_chosen() -> None:
    first = _stored(ops.incrby("n", 1), offset=4)
    again = _stored(republished_copy(first, first.letter.op), offset=9)  # type: ignore[union-attr]
    records = [first, again]
    broad = select(records, where=_filter(), replays_by_choice_only=True)
    assert (broad.chosen, broad.replays_left_out) == ([first], [again])
    assert select(records, where=_filter(replayed=True), replays_by_choice_only=True).chosen == [again]
    assert select(records, refs=[again.ref], replays_by_choice_only=True).chosen == [again]
    assert select(records, where=_filter(op_ids=[again.op_id]), replays_by_choice_only=True).chosen == [again]
    assert select(records).chosen == records  # list and purge see every record


def test_limit_takes_the_oldest_matching_records() -> None:
    records = [_stored(ops.set(f"k{i}", i), age=100 - i, offset=i) for i in range(5)]
    newest_first = list(reversed(records))
    assert select(newest_first, limit=2).chosen == records[:2]
    assert select(newest_first, where=_filter(key="k[34]"), limit=1).chosen == [records[3]]


def test_op_ids_and_refs_name_records() -> None:
    one, two = _stored(ops.set("a", 1), offset=1), _stored(ops.set("b", 1), offset=2)
    assert select([one, two], where=_filter(op_ids=[two.op_id])).chosen == [two]
    chosen, unknown, _ = select([one, two], refs=["0:1", "9:9"])
    assert (chosen, unknown) == ([one], ["9:9"])
