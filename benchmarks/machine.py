"""What a result was measured on: the machine, library and server versions, and which code.

Every result records these beside its numbers, so two results can be compared knowingly.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import celery_redis_retry
from celery_redis_retry.testing import redis_server_binary, tansu_binary

from .stack import bench_env, rabbitmq_reachable

#: Distributions whose versions explain a result.
_VERSIONS = ("celery-redis-retry", "confluent-kafka", "orjson", "msgspec", "celery", "kombu", "redis")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, OS, Python and library versions."""
    versions: dict[str, str | None] = {}
    for name in _VERSIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        import confluent_kafka

        versions["librdkafka"] = confluent_kafka.libversion()[0]
    except ImportError:
        versions["librdkafka"] = None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "versions": versions,
    }


def describe_machine(info: dict[str, Any]) -> str:
    """One line of :func:`machine` for the console and the markdown."""
    versions = ", ".join(f"{name} {version}" for name, version in info["versions"].items() if version)
    return (
        f"{info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), {info['os']}, {info['python']}; "
        f"{versions}; load average at the end {' '.join(f'{x:.2f}' for x in info['load_average'] or ())}"
    )


def server_versions() -> dict[str, str | None]:
    """Versions of the servers the benchmarks start (redis-server, Tansu) and of RabbitMQ if reachable."""
    def first_line(argv: list[str]) -> str | None:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr) else None

    out: dict[str, str | None] = {}
    try:
        out["redis-server"] = first_line([redis_server_binary(), "--version"])
    except Exception:  # noqa: BLE001
        out["redis-server"] = None
    try:
        out["tansu"] = first_line([tansu_binary(), "--version"])
    except Exception:  # noqa: BLE001
        out["tansu"] = None
    out["rabbitmq"] = rabbitmq_reachable()
    return out


def code_under_test() -> dict[str, Any]:
    """Which copy of celery_redis_retry is measured: its folder, the git commit if it is a checkout.

    The bridge and worker subprocesses run from a temporary folder with ``PYTHONPATH`` as
    :func:`bench_env` sets it, so they may import another copy than this process (where
    ``python -m`` puts the current folder first): both are recorded. ``CRR_BENCH_CODE_LABEL``
    adds a free-form label (e.g. "git archive of 2c526e6").
    """
    def describe(folder: Path) -> dict[str, Any]:
        out: dict[str, Any] = {"package_path": str(folder), "git_head": None, "uncommitted_changes": None}
        try:
            head = subprocess.run(["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True, timeout=10, check=True).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--", "."],
                                   capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return out
        out["git_head"], out["uncommitted_changes"] = head, bool(dirty)
        return out

    env = {**os.environ, "PYTHONPATH": bench_env(broker_url="", bootstrap="", target_url="", topic="", group="",
                                                 queue="", spool="")["PYTHONPATH"]}
    found = subprocess.run(
        [sys.executable, "-c", "import celery_redis_retry, os; print(os.path.dirname(celery_redis_retry.__file__))"],
        capture_output=True, text=True, timeout=60, check=False, env=env, cwd=tempfile.gettempdir(),
    ).stdout.strip()
    here = Path(celery_redis_retry.__file__).resolve().parent
    subprocesses = Path(found).resolve() if found else here
    out = describe(subprocesses)
    out["label"] = os.environ.get("CRR_BENCH_CODE_LABEL")
    if subprocesses != here:
        out["in_benchmark_process"] = describe(here)
    return out


def describe_code(code: dict[str, Any]) -> str:
    """One line of :func:`code_under_test` for the markdown."""
    def one(part: dict[str, Any]) -> str:
        if part.get("git_head") is None:
            return f"celery_redis_retry from {part['package_path']}"
        state = "with uncommitted changes" if part.get("uncommitted_changes") else "clean"
        return f"celery_redis_retry from {part['package_path']} at {part['git_head']} ({state})"

    text = one(code) + (f" ({code['label']})" if code.get("label") else "")
    if code.get("in_benchmark_process"):
        text += f" in the bridge and worker; {one(code['in_benchmark_process'])} in the benchmark process"
    return text
