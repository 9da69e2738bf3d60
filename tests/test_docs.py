"""The docs show only commands, options and settings that exist.

Every ``redis-retry <subcommand> [--option]`` (``celery -A app redis-retry ...``) and every
``celery-redis-retry <subcommand>`` of README.md and docs/*.md is looked up in the real click
command tree, and every ``redis_retry_*`` key they name must be a setting the code reads.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import click
import pytest

from celery_redis_retry import cli, names
from celery_redis_retry.config import DEFAULTS, KEYS, Settings

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: A command line as the docs show it: the program, then words and --options.
COMMAND = re.compile(r"(?<![\w-])(?P<program>celery-redis-retry|redis-retry)(?P<rest>(?: +(?:--?[\w-]+|[a-z][\w-]*))+)")
#: ``-Q redis-retry``: the Celery queue of that name, not the command.
QUEUE = re.compile(r"-Q +$")


def _mentions(pattern: re.Pattern[str]) -> Iterator[tuple[str, int, re.Match[str]]]:
    for path in DOCS:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for found in pattern.finditer(line):
                if not QUEUE.search(line[: found.start()]):
                    yield f"{path.relative_to(ROOT)}:{number}", number, found


def _resolve(group: click.Group, words: list[str]) -> str | None:
    """What is wrong with ``words`` as a command line of ``group`` (None: it exists)."""
    command: click.Command = group
    path = [group.name or ""]
    for word in words:
        if word.startswith("-"):
            options = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
            if word not in options | {"--help"}:
                return f"{' '.join(path)} has no option {word} (it has {', '.join(sorted(options)) or 'none'})"
        elif isinstance(command, click.Group):
            sub = command.commands.get(word)
            if sub is None:
                return f"{' '.join(path)} has no subcommand {word!r} (it has {', '.join(sorted(command.commands))})"
            command = sub
            path.append(word)
        else:
            break  # an argument of the command (a record reference, a file)
    if command is group and "--help" not in words:
        return f"{group.name} without a subcommand"
    return None


def _commands() -> list[tuple[str, str, list[str]]]:
    found = []
    for where, _, match in _mentions(COMMAND):
        found.append((where, match.group("program"), match.group("rest").split()))
    return found


def test_the_docs_show_commands() -> None:
    programs = {program for _, program, _ in _commands()}
    assert programs == {"redis-retry", "celery-redis-retry"}  # the extraction itself works


@pytest.mark.parametrize(("where", "program", "words"), _commands(), ids=lambda v: v if isinstance(v, str) else None)
def test_each_command_the_docs_show_exists(where: str, program: str, words: list[str]) -> None:
    group = cli.redis_retry if program == "redis-retry" else cli.main
    wrong = _resolve(group, words)
    assert wrong is None, f"{where}: `{program} {' '.join(words)}`: {wrong}"


def test_a_command_that_does_not_exist_is_found() -> None:
    assert _resolve(cli.redis_retry, ["dlq", "list"]) is None
    assert _resolve(cli.redis_retry, ["status", "--json"]) is None
    assert "no subcommand 'metrics'" in str(_resolve(cli.redis_retry, ["metrics"]))
    assert "no option --verbose" in str(_resolve(cli.redis_retry, ["bridge", "--verbose"]))


class _Recording(dict[str, Any]):
    """A configuration that remembers every key the settings looked up."""

    looked_up: set[str]

    def __init__(self, values: Mapping[str, Any]) -> None:
        super().__init__(values)
        self.looked_up = set()

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        self.looked_up.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self.looked_up.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.looked_up.add(str(key))
        return super().__contains__(key)


def known_settings() -> set[str]:
    """Every ``redis_retry_*`` key the settings read, as the real code reads them, and the defaults."""
    config = _Recording({"redis_retry_kafka": {"bootstrap.servers": "127.0.0.1:9092"},
                         "redis_retry_targets": {"default": "redis://127.0.0.1:6379/0"}})
    Settings.from_mapping(config)
    return {k for k in config.looked_up if k.startswith("redis_retry_")} | set(DEFAULTS)


#: Names the docs show on purpose although no code reads them, and why.
NOT_SETTINGS = {
    "redis_retry_max_retry": "the misspelling the startup check is shown refusing",
    "redis_retry_on_timeout": "Celery's own setting, which the startup check leaves alone",
}


def test_each_setting_the_docs_name_exists() -> None:
    known = known_settings()
    assert {"redis_retry_kafka", "redis_retry_targets", "redis_retry_topic"} <= known
    assert known == set(KEYS), "the keys the settings read are the keys the startup check knows"
    assert not known & set(NOT_SETTINGS)
    unknown = [f"{where}: {match.group()}" for where, _, match in _mentions(re.compile(r"redis_retry_[a-z_]*[a-z]"))
               if match.group() not in known and match.group() not in NOT_SETTINGS]
    assert not unknown, "settings the code does not read:\n" + "\n".join(unknown)


#: A row of the table in docs/configuration.md: the key, then its default.
DEFAULT_ROW = re.compile(r"^\| `(redis_retry_\w+)` \| `([^`]*)`")


def test_each_default_in_the_configuration_table_is_the_code_s() -> None:
    shown = {}
    for line in (ROOT / "docs" / "configuration.md").read_text().splitlines():
        row = DEFAULT_ROW.match(line)
        if row is not None:
            try:
                shown[row.group(1)] = ast.literal_eval(row.group(2))
            except (ValueError, SyntaxError):
                if isinstance(DEFAULTS.get(row.group(1)), str):
                    shown[row.group(1)] = row.group(2)  # a name written as it is: redis-retry-queue
                # else a default described in words: "<redis_retry_topic>.dlq", a path
    assert len(shown) > 20, shown
    wrong = {key: (value, DEFAULTS[key]) for key, value in shown.items() if key in DEFAULTS and value != DEFAULTS[key]}
    assert not wrong, f"(docs, code): {wrong}"
    assert set(shown) <= set(DEFAULTS)


def test_the_exit_codes_the_docs_list_are_the_cli_s() -> None:
    rows = re.findall(r"^\| (\d+) \| `(EXIT_\w+)` \|", (ROOT / "docs" / "operations.md").read_text(), re.MULTILINE)
    assert len(rows) >= 5
    assert {name: int(code) for code, name in rows} == {name: getattr(names, name) for _, name in rows}
    assert {name for _, name in rows} == {name for name in vars(names) if name.startswith("EXIT_")}


def test_the_architecture_table_names_every_module() -> None:
    table = (ROOT / "docs" / "architecture.md").read_text()
    package = ROOT / "celery_redis_retry"
    modules = sorted(
        f"{p.parent.name}/" if p.parent.name in ("testing", "demo") else p.relative_to(package).as_posix()
        for p in package.rglob("*.py")
        if p.name != "__main__.py" and (p.name != "__init__.py" or p.parent == package)
    )
    modules += [p.relative_to(package).as_posix() for p in package.rglob("*.lua")]
    assert len(modules) > 40
    assert [name for name in sorted(set(modules)) if f"`{name}`" not in table] == []


#: A row of the reasons table in docs/operations.md: outcome, then the reason.
REASON_ROW = re.compile(r"^\| (?:dead|rejected) \| `(\w+)` \|")


def test_every_dead_letter_reason_is_explained_in_the_docs() -> None:
    from celery_redis_retry.dlq.record import REASONS

    rows = [m.group(1) for line in (ROOT / "docs" / "operations.md").read_text().splitlines()
            if (m := REASON_ROW.match(line))]
    assert sorted(rows) == sorted(REASONS), "docs/operations.md's reasons table and dlq.REASONS differ"
