"""``make demo`` itself: the demo runs as a user runs it, shorter, and its accounting balances."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from celery_redis_retry.demo.verify import Accounting

pytestmark = pytest.mark.slow


def test_the_demo_balances_its_accounting() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "celery_redis_retry.demo", "--rate", "100", "--duration", "7", "--outage-seconds", "3"],
        capture_output=True, text=True, timeout=180, check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    rows = {name: int(n) for name, n in re.findall(
        r"^  (writes attempted|published|applied|expired|superseded|dead|rejected|foreign message|lost|"
        r"newer writes overwritten|duplicate effects)\s+(\d+)", output, re.MULTILINE,
    )}
    # The table adds up as printed: every row named, no count in two sums.
    attempted = re.search(r"^  writes attempted\s+(\d+)\s+= (\d+) applied at once \+ (\d+) captured \+ (\d+) "
                          r"refused at once", output, re.MULTILINE)
    assert attempted is not None, output
    total, *parts = (int(n) for n in attempted.groups())
    assert total == sum(parts) == rows["writes attempted"], output
    assert int(attempted.group(3)) == rows["published"], output
    ended = ("applied", "expired", "superseded", "dead", "rejected")
    assert rows["published"] == sum(rows[name] for name in ended), output
    assert rows["foreign message"] == 1, "the message put straight onto the topic has its own row"
    assert rows["lost"] == 0, output
    assert rows["newer writes overwritten"] == 0, output
    assert rows["superseded"] > 0, "the hot keys written again after the outage supersede their replays"
    assert rows["duplicate effects"] == 0, output
    assert rows["published"] > 0, "the outage should have captured writes"
    assert rows["applied"] > 0, output
    assert rows["rejected"] >= 1, "the captured calls of a script the workers do not know are rejected"
    assert "the accounting balances" in output
    assert "Redis KILLED" in output
    assert "restarted on the same port" in output


def test_the_demo_verification_fails_when_its_rows_do_not_add_up() -> None:
    acc = Accounting(attempted=10, direct=5, captured=5, published=5, applied=3, foreign=1)
    acc.dead["wrong_type"] = 1
    acc.rejected["unknown_script"] = 1
    acc.foreign_rejected["unsupported_version"] = 1
    acc.dead_letters = 2
    assert acc.sums == []
    assert acc.balanced
    acc.rejected["unsupported_version"] += 1  # the foreign message counted among the captured ops' rows
    assert acc.sums == ["published 5 != applied + expired + superseded + dead + rejected 6"]
    assert not acc.balanced
