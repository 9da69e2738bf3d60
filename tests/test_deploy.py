"""The deployment files in examples/deploy: valid manifests and units that run real commands.

The Kubernetes manifests are validated against the API's own schemas (kubernetes-validate,
strict: an unknown field is an error). The commands in them and in the systemd units must
use options the commands have, the bridge's probes must hit the port its --health-port
names, and every setting the ConfigMap gives must be one the example app reads.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import click
import kubernetes_validate
import pytest
import yaml
from celery.bin.worker import worker as celery_worker

from celery_redis_retry.cli.commands import redis_retry

DEPLOY = Path(__file__).parent.parent / "examples" / "deploy"
EXAMPLE_APP = Path(__file__).parent.parent / "examples" / "profile_service" / "celery_app.py"
#: The oldest Kubernetes release the manifests are meant for.
KUBERNETES_VERSION = "1.29"


def _documents() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, document) for path in sorted((DEPLOY / "kubernetes").glob("*.yaml"))
            for document in yaml.safe_load_all(path.read_text()) if document]


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [document for _, document in _documents() if document["kind"] == kind]


def _containers() -> list[dict[str, Any]]:
    pods = [d["spec"]["template"]["spec"] for d in _documents_of("Deployment", "Job")]
    return [container for pod in pods for container in pod["containers"]]


def _documents_of(*kinds: str) -> list[dict[str, Any]]:
    return [document for _, document in _documents() if document["kind"] in kinds]


@pytest.mark.parametrize(("name", "document"), _documents(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_each_manifest_is_valid_for_the_kubernetes_api(name: str, document: dict[str, Any]) -> None:
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_bridge_and_worker_run_with_a_disruption_budget_and_resources() -> None:
    deployments = {d["metadata"]["name"]: d for d in _by_kind("Deployment")}
    assert set(deployments) == {"redis-retry-bridge", "redis-retry-worker"}
    budgets = {tuple(sorted(b["spec"]["selector"]["matchLabels"].items())) for b in _by_kind("PodDisruptionBudget")}
    for deployment in deployments.values():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert tuple(sorted(deployment["spec"]["selector"]["matchLabels"].items())) in budgets
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for container in _containers():
        assert {"requests", "limits"} <= container["resources"].keys(), container["name"]


def _option_names(command: click.Command) -> set[str]:
    return {name for param in command.params for name in param.opts if name.startswith("-")}


def _check_command(argv: list[str]) -> None:
    """``argv`` (a ``celery -A app ...`` line) uses only options its command has."""
    assert argv[0].endswith("celery"), argv
    assert argv[1] == "-A", argv
    rest = argv[3:]
    if rest[0] == "worker":
        command, args = celery_worker, rest[1:]
    else:
        assert rest[0] == "redis-retry", argv
        command, args = redis_retry, rest[1:]
        while isinstance(command, click.Group):
            command, args = command.commands[args[0]], args[1:]
    unknown = [arg for arg in args if arg.startswith("-") and arg not in _option_names(command)]
    assert not unknown, f"{shlex.join(argv)}: no such option {unknown}"


def test_every_command_uses_options_its_command_has() -> None:
    commands = [c["command"] for c in _containers()]
    for unit in sorted((DEPLOY / "systemd").glob("*.service")):
        commands += [shlex.split(line.split("=", 1)[1]) for line in unit.read_text().splitlines()
                     if line.startswith("ExecStart=")]
    assert len(commands) >= 5
    for argv in commands:
        _check_command(argv)


def test_the_bridge_is_probed_where_it_serves_its_health() -> None:
    [bridge] = [c for c in _containers() if c["name"] == "bridge"]
    argv = bridge["command"]
    health_port = int(argv[argv.index("--health-port") + 1])
    ports = {port["name"]: port["containerPort"] for port in bridge["ports"]}
    assert ports["health"] == health_port
    assert bridge["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert bridge["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert ports["metrics"] == int(argv[argv.index("--metrics-port") + 1])


def test_every_setting_given_is_one_the_example_app_reads() -> None:
    source = EXAMPLE_APP.read_text()
    given = set(_by_kind("ConfigMap")[0]["data"])
    given |= {e["name"] for c in _containers() for e in c.get("env", [])}
    unread = sorted(name for name in given if f'"{name}"' not in source)
    assert not unread, f"set in the manifests, read nowhere in {EXAMPLE_APP.name}: {unread}"
