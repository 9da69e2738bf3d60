"""The progress of a long ``dlq replay``: a bar on a terminal, plain lines otherwise, none when short."""

from __future__ import annotations

import io

import pytest

from celery_redis_retry.cli import progress
from celery_redis_retry.cli.progress import ReplayProgress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "LINE_EVERY", 0.0)
    stream = io.StringIO()
    with ReplayProgress(40, stream=stream) as shown:
        for done in range(1, 41):
            shown.update(done)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 40
    assert lines[-1].startswith("replayed 40/40, ")
    assert lines[-1].endswith(" s left")
    assert "ops/s" in lines[0]


def test_a_line_a_second_at_most() -> None:
    stream = io.StringIO()
    with ReplayProgress(100, stream=stream) as shown:
        for done in range(1, 100):
            shown.update(done)
    assert stream.getvalue() == ""  # under a second: nothing until the last record
    shown.update(100)
    assert stream.getvalue().startswith("replayed 100/100")


def test_a_bar_on_a_terminal() -> None:
    stream = _Terminal()
    with ReplayProgress(30, stream=stream) as shown:
        for done in range(1, 31):
            shown.update(done)
    assert "30/30" in stream.getvalue()
    assert "ops/s" in stream.getvalue()


def test_nothing_for_a_few_records() -> None:
    for stream in (io.StringIO(), _Terminal()):
        with ReplayProgress(progress.MIN_RECORDS - 1, stream=stream) as shown:
            shown.update(progress.MIN_RECORDS - 1)
        assert stream.getvalue() == ""
