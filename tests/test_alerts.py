"""The Prometheus alert rules in examples/prometheus: valid, unit-tested, and about real metrics.

``promtool`` (Debian's ``prometheus`` package; ``.ci/services`` installs it) checks the rules
and runs their unit tests. Every alert must have a test case where it fires and one where
it stays quiet, and every ``crr_*`` series a rule reads must be one the code exports.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from exported_metrics import exported_names

RULES_DIR = Path(__file__).parent.parent / "examples" / "prometheus"
RULES = RULES_DIR / "alerts.yml"
RULE_TESTS = RULES_DIR / "alerts_test.yml"


def promtool() -> str:
    """The promtool binary; skip (fail with ``CRR_REQUIRE_PROMTOOL=1``) where there is none."""
    found = shutil.which("promtool")
    if found is None:
        missing = "no promtool on PATH (Debian: apt-get install prometheus)"
        if os.environ.get("CRR_REQUIRE_PROMTOOL") == "1":
            pytest.fail(f"{missing}, and CRR_REQUIRE_PROMTOOL=1")
        pytest.skip(f"{missing}; set CRR_REQUIRE_PROMTOOL=1 to make this a failure")
    return found


def _alerts() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"] if "alert" in rule]


@pytest.mark.slow  # runs promtool
def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in result.stdout


@pytest.mark.slow  # runs promtool
def test_promtool_unit_tests_of_the_rules_pass() -> None:
    result = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], cwd=RULES_DIR,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_case_where_it_fires_and_one_where_it_stays_quiet() -> None:
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    for alert in (rule["alert"] for rule in _alerts()):
        mine = [case for case in cases if case["alertname"] == alert]
        assert any(case["exp_alerts"] for case in mine), f"{alert} is never shown firing"
        assert any(not case["exp_alerts"] for case in mine), f"{alert} is never shown staying quiet"


def test_the_rules_read_only_series_the_code_exports(monkeypatch: pytest.MonkeyPatch) -> None:
    exported = exported_names(monkeypatch)
    assert {"crr_bridge_assigned_partitions", "crr_replay_ops_total", "crr_spool_messages"} <= exported
    read = {name for rule in _alerts() for name in re.findall(r"\bcrr_[a-z_]+\b", rule["expr"])}
    assert read, "the rules read no crr_* series"
    assert read <= exported, f"the rules read series no role exports: {sorted(read - exported)}"
