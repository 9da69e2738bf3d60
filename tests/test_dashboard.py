"""The Grafana dashboard in examples/grafana: every query reads series the code exports, and parses.

PromQL syntax is checked by promtool: each panel query becomes a recording rule of a
scratch rule file (Grafana's ``$__rate_interval`` and ``$__range`` replaced by durations).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from exported_metrics import exported_names
from test_alerts import promtool

DASHBOARD = Path(__file__).parent.parent / "examples" / "grafana" / "celery-redis-retry.json"
#: Grafana's own variables, and durations promtool accepts in their place.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "6h", "$__interval": "1m"}


def _panels() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


def _queries() -> list[str]:
    return [target["expr"] for panel in _panels() for target in panel["targets"]]


def test_the_dashboard_covers_the_three_roles_with_unique_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert [p["title"] for p in dashboard["panels"] if p["type"] == "row"] == [
        "Capture (application processes)", "Bridge (Kafka to Celery)", "Replay (Celery workers)"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in _panels():
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["description"], f"panel {panel['title']!r} says nothing of what it shows"


def test_every_query_reads_series_the_code_exports(monkeypatch: pytest.MonkeyPatch) -> None:
    exported = exported_names(monkeypatch)
    read = {name for query in _queries() for name in re.findall(r"\bcrr_[a-z_]+\b", query)}
    assert read <= exported, f"the dashboard reads series no role exports: {sorted(read - exported)}"
    # Every series is on the dashboard (the oldest-retry gauge included).
    assert exported <= read, f"exported series missing from the dashboard: {sorted(exported - read)}"


@pytest.mark.slow  # runs promtool
def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    rules = []
    for n, query in enumerate(_queries()):
        expr = query
        for variable, duration in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, duration)
        rules.append({"record": f"dashboard:query_{n}", "expr": expr})
    rule_file = tmp_path / "dashboard_rules.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool(), "check", "rules", str(rule_file)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout
