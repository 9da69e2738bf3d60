"""The package's shape: no import cycle, the bridge apart from the worker, short modules, public names kept.

Read from the source with :mod:`ast`, so imports inside functions (the lazy ones) count
as much as those at the top: a cycle that only a lazy import keeps from failing at
import time is still two modules that cannot be read, tested or changed apart. Only the
imports under ``if TYPE_CHECKING:`` are left out: they name a type for the checker and
never run.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "celery_redis_retry"
NAME = "celery_redis_retry"

#: Past this many lines a module says in its docstring why it is kept whole.
LONG_MODULE = 400
LONG_REASON = "Kept whole:"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _type_only(tree: ast.Module) -> set[ast.AST]:
    """The imports under ``if TYPE_CHECKING:``: types for the checker, never run."""
    return {node for block in ast.walk(tree) if isinstance(block, ast.If) and ast.unparse(block.test).endswith(
        "TYPE_CHECKING") for statement in block.body for node in ast.walk(statement)}


def _imported(module: str, path: Path) -> Iterator[str]:
    """The package's modules that ``module`` imports, anywhere in its body but the type-only block."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    type_only = _type_only(tree)
    for node in ast.walk(tree):
        if node in type_only:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # "from package import module" imports the module; "from module import name" the module.
            names = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source
                     for alias in node.names]
        else:
            continue
        for name in names:
            if name in MODULES and name != module:
                yield name


GRAPH = {module: sorted(set(_imported(module, path))) for module, path in MODULES.items()}


def _cycle() -> list[str] | None:
    """One import cycle among the package's modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in GRAPH[module]:
            if state.get(target) == 1:
                return [*path[path.index(target):], target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[module] = 2
        return None

    for module in GRAPH:
        if module not in state and (found := visit(module)):
            return found
    return None


def _reachable(start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for target in GRAPH[stack.pop()]:
            if target not in seen:
                seen.add(target)
                stack.append(target)
    return seen


def test_the_graph_is_read_from_the_source() -> None:
    # A check that finds nothing because it reads nothing cannot fail: make sure it reads.
    assert len(MODULES) > 40
    assert "celery_redis_retry.bridge.dispatch" in GRAPH["celery_redis_retry.bridge.loop"]
    assert "celery_redis_retry.capture.producer" in GRAPH["celery_redis_retry.capture.guard"]


def test_no_import_cycle_among_the_package_s_modules() -> None:
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_finds_a_cycle() -> None:
    GRAPH["celery_redis_retry.names"].append("celery_redis_retry.bridge.loop")
    try:
        assert _cycle() is not None
    finally:
        GRAPH["celery_redis_retry.names"].remove("celery_redis_retry.bridge.loop")


@pytest.mark.parametrize("side", ["celery_redis_retry.bridge.loop", "celery_redis_retry.cli.status"])
def test_the_bridge_side_imports_nothing_of_the_worker_side(side: str) -> None:
    worker_side = {m for m in _reachable(side) if m.startswith(f"{NAME}.replay")}
    assert worker_side == set(), f"{side} reaches {sorted(worker_side)}"


def test_a_long_module_says_why_it_is_kept_whole() -> None:
    unexplained = []
    for module, path in MODULES.items():
        lines = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > LONG_MODULE and LONG_REASON not in doc:
            unexplained.append(f"{module} ({lines} lines)")
    assert unexplained == [], f"over {LONG_MODULE} lines without a {LONG_REASON!r} paragraph: {unexplained}"


def test_every_subpackage_names_its_step() -> None:
    undocumented = [module for module, path in MODULES.items()
                    if path.name == "__init__.py" and not ast.get_docstring(ast.parse(path.read_text()))]
    assert undocumented == []


#: What users import, configure or run, as written in README.md, docs/ and the design.
PUBLIC = {
    NAME: ["install", "publish", "on_failure", "wrap", "ops", "RedisOp", "RetryProducer", "Settings",
           "settings_for", "default_producer", "ConfigurationError", "RedisRetryError", "PublishError",
           "EncodeError", "DecodeError", "SignatureError", "CommandNotAllowedError", "CapturedWriteError",
           "__version__"],
    f"{NAME}.ops": ["command", "set", "delete", "hset", "hdel", "sadd", "srem", "zadd", "expire", "incrby",
                    "lpush", "rpush", "pipeline", "script", "RedisOp"],
    f"{NAME}.tasks": ["replay", "replay_batch", "dead_letter"],
    f"{NAME}.cli": ["main", "redis_retry"],
    f"{NAME}.metrics": ["register_producer_metrics"],
    f"{NAME}.message": ["encode", "decode"],
    f"{NAME}.slots": ["marker_key"],
    f"{NAME}.dlq": ["decode_record"],
    f"{NAME}.testing": ["RedisServer"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_every_documented_public_name_is_importable(module: str) -> None:
    imported = importlib.import_module(module)
    assert [name for name in PUBLIC[module] if not hasattr(imported, name)] == []


def test_the_redis_op_keeps_its_chainable_copies() -> None:
    from celery_redis_retry import RedisOp, RetryProducer

    for method in ("with_context", "with_source", "with_max_retries", "with_target", "with_error", "with_deadline"):
        assert callable(getattr(RedisOp, method)), method
    for method in ("from_app", "publish", "flush", "close"):
        assert callable(getattr(RetryProducer, method)), method


def test_the_task_names_are_the_wire_contract() -> None:
    from celery import Celery

    from celery_redis_retry import names, tasks  # noqa: F401 - importing tasks registers the shared tasks

    assert (names.REPLAY_TASK, names.REPLAY_BATCH_TASK, names.DEAD_LETTER_TASK) == (
        "celery_redis_retry.replay", "celery_redis_retry.replay_batch", "celery_redis_retry.dead_letter")
    # An app of its own: the shared tasks' proxies resolve in the current app, which an
    # earlier test may have replaced with one that never imported them.
    app = Celery("task-names", set_as_current=False)
    app.finalize()
    registered = {app.tasks[name].name for name in (names.REPLAY_TASK, names.REPLAY_BATCH_TASK,
                                                    names.DEAD_LETTER_TASK)}
    assert registered == {names.REPLAY_TASK, names.REPLAY_BATCH_TASK, names.DEAD_LETTER_TASK}


def test_the_installed_entry_points_load() -> None:
    from importlib.metadata import entry_points

    commands = {ep.name: ep for ep in entry_points(group="celery.commands")}
    scripts = {ep.name: ep for ep in entry_points(group="console_scripts")}
    assert callable(commands["redis-retry"].load())
    assert callable(scripts["celery-redis-retry"].load())


#: Every configuration key, as released: none may disappear or change its name.
RELEASED_KEYS = {
    "redis_retry_kafka", "redis_retry_targets", "redis_retry_topic", "redis_retry_dlq_topic",
    "redis_retry_ends_topic", "redis_retry_consumer_group", "redis_retry_queue", "redis_retry_max_retries",
    "redis_retry_backoff", "redis_retry_backoff_max", "redis_retry_jitter", "redis_retry_scripts",
    "redis_retry_signing_keys", "redis_retry_allowed_commands", "redis_retry_spool_path",
    "redis_retry_spool_max_bytes", "redis_retry_durable_publish", "redis_retry_max_message_bytes",
    "redis_retry_dedupe_ttl", "redis_retry_write_stamps", "redis_retry_batch_size", "redis_retry_batch_linger_ms",
    "redis_retry_queue_high_water", "redis_retry_max_age", "redis_retry_max_countdown_tasks",
    "redis_retry_recovery_rate", "redis_retry_commit_after", "redis_retry_redelivery_timeout",
    "redis_retry_max_in_flight", "redis_retry_bridge_metrics_port", "redis_retry_worker_metrics_port",
    "redis_retry_bridge_health_port", "redis_retry_critical_queue",
}


def test_every_released_configuration_key_is_still_read() -> None:
    from celery_redis_retry.config import KEYS

    assert RELEASED_KEYS - set(KEYS) == set()
