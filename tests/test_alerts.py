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
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from celery_redis_retry import metrics
from celery_redis_retry.bridge.circuits import CircuitState
from celery_redis_retry.bridge.loop import BridgeStats

RULES_DIR = Path(__file__).parent.parent / "examples" / "prometheus"
RULES = RULES_DIR / "alerts.yml"
RULE_TESTS = RULES_DIR / "alerts_test.yml"


def _promtool() -> str:
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


def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in result.stdout


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    result = subprocess.run([_promtool(), "test", "rules", RULE_TESTS.name], cwd=RULES_DIR,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_case_where_it_fires_and_one_where_it_stays_quiet() -> None:
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    for alert in (rule["alert"] for rule in _alerts()):
        mine = [case for case in cases if case["alertname"] == alert]
        assert any(case["exp_alerts"] for case in mine), f"{alert} is never shown firing"
        assert any(not case["exp_alerts"] for case in mine), f"{alert} is never shown staying quiet"


def _family_names(families: Iterator[Any]) -> set[str]:
    """The series names of metric families, as a scrape shows them (counters get ``_total``)."""
    names = set()
    for family in families:
        names.add(f"{family.name}_total" if family.type == "counter" else family.name)
    return names


def exported_names(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Every series the three roles serve, read from their collectors (nothing is served)."""
    import prometheus_client

    monkeypatch.setattr(metrics, "serve", lambda _port, collector, **_kw: collector)
    monkeypatch.setattr(metrics, "_outcome_counts", None)  # serve_worker_metrics sets it; put it back after
    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    metrics.register_producer_metrics(registry)
    names = _family_names(registry.collect())
    bridge = SimpleNamespace(
        stats=BridgeStats(), reading_paused=False, assigned_partitions=0, in_flight=0, retrying_ops=0,
        oldest_retrying_seconds=1.0,
        circuits=SimpleNamespace(snapshot=lambda: [CircuitState("default", "open", 0.0, "down", 1)]),
    )
    names |= _family_names(metrics.serve_bridge_metrics(bridge, 0).collect())  # type: ignore[arg-type]
    names |= _family_names(metrics.serve_worker_metrics(0).collect())
    return names


def test_the_rules_read_only_series_the_code_exports(monkeypatch: pytest.MonkeyPatch) -> None:
    exported = exported_names(monkeypatch)
    assert {"crr_bridge_assigned_partitions", "crr_replay_ops_total", "crr_spool_messages"} <= exported
    read = {name for rule in _alerts() for name in re.findall(r"\bcrr_[a-z_]+\b", rule["expr"])}
    assert read, "the rules read no crr_* series"
    assert read <= exported, f"the rules read series no role exports: {sorted(read - exported)}"
