"""``make demo`` itself: the demo runs as a user runs it, shorter, and its accounting balances."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_the_demo_balances_its_accounting() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "celery_redis_retry.demo", "--rate", "100", "--duration", "7", "--outage-seconds", "3"],
        capture_output=True, text=True, timeout=180, check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    rows = dict(re.findall(
        r"^  (writes attempted|published|applied|superseded|dead|rejected|lost|newer writes overwritten|"
        r"duplicate effects)\s+(\d+)", output, re.MULTILINE,
    ))
    assert rows["lost"] == "0", output
    assert rows["newer writes overwritten"] == "0", output
    assert int(rows["superseded"]) > 0, "the hot keys written again after the outage supersede their replays"
    assert rows["duplicate effects"] == "0", output
    assert int(rows["published"]) > 0, "the outage should have captured writes"
    assert int(rows["applied"]) > 0, output
    assert int(rows["rejected"]) >= 1, "the wire-format v2 message is rejected"
    assert "the accounting balances" in output
    assert "Redis KILLED" in output
    assert "restarted on the same port" in output
