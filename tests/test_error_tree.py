"""Every exception class of the package is defined in ``errors.py``, and ``errors.py`` stays light.

One module holds the whole exception tree, so a user (or a reader) finds every error the
package can raise in one place. ``errors.py`` is imported by every process, the
application's hot path included: it imports no Kafka, Celery or click module.
"""

from __future__ import annotations

import ast
import builtins
from collections.abc import Iterable
from pathlib import Path

from celery_redis_retry import errors

PACKAGE = Path(errors.__file__).resolve().parent
ERRORS = PACKAGE / "errors.py"

#: Exception classes allowed outside errors.py: (path in the package, class) -> why.
ALLOWED_ELSEWHERE = {
    ("replay/worker.py", "_WorkerSettingsRefused"): (
        "derives from Celery's CeleryCommandException (a click exception) so that `celery worker` "
        "prints one line and exits 3; errors.py cannot import Celery or click"
    ),
}

#: What errors.py may import at module level.
ERRORS_MAY_IMPORT = {"__future__", "typing"}

_BUILTIN_EXCEPTIONS = {
    name for name, value in vars(builtins).items() if isinstance(value, type) and issubclass(value, BaseException)
}


def _base_name(node: ast.expr) -> str:
    """``KafkaException`` for ``KafkaException`` and ``kafka.KafkaException``; '' for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _looks_like_an_exception(name: str) -> bool:
    # Bases from other libraries (KafkaException, CeleryCommandException, ChannelError...)
    # are only known here by name: every one of them is named so.
    return name in _BUILTIN_EXCEPTIONS or name.endswith(("Error", "Exception"))


def exception_classes(sources: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """(path, class) of every class in ``sources`` ((path, text) pairs) deriving from an exception.

    A class counts when a base is a builtin exception, is named ``...Error`` or
    ``...Exception``, or is itself such a class of ``sources`` (found to a fixed point, so
    a subclass of a subclass counts too).
    """
    classes = [
        (path, node.name, [_base_name(b) for b in node.bases])
        for path, text in sources
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.ClassDef)
    ]
    found: set[tuple[str, str]] = set()
    known: set[str] = set()
    while True:
        new = {
            (path, name) for path, name, bases in classes
            if (path, name) not in found and any(_looks_like_an_exception(b) or b in known for b in bases)
        }
        if not new:
            return sorted(found)
        found |= new
        known |= {name for _path, name in new}


def _package_sources() -> list[tuple[str, str]]:
    return [(p.relative_to(PACKAGE).as_posix(), p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))]


def test_every_exception_class_is_defined_in_errors_py() -> None:
    found = exception_classes(_package_sources())
    elsewhere = [(path, name) for path, name in found if path != "errors.py" and (path, name) not in ALLOWED_ELSEWHERE]
    assert elsewhere == [], f"define these in celery_redis_retry/errors.py: {elsewhere}"
    # The check sees the tree: errors.py's classes are found, including those that derive
    # only from another class of errors.py.
    in_errors = {name for path, name in found if path == "errors.py"}
    assert in_errors == set(errors.__all__)


def test_each_exception_allowed_elsewhere_still_exists_and_says_why() -> None:
    found = set(exception_classes(_package_sources()))
    for where, why in ALLOWED_ELSEWHERE.items():
        assert where in found, f"{where} is allowed outside errors.py but no longer exists: drop it from the list"
        assert why.strip()


def test_a_new_exception_outside_errors_py_is_found() -> None:
    sources = [
        ("bridge/new.py", "class Stuck(RuntimeError):\n    pass\n"),
        ("kafka/new.py", "import confluent_kafka\nclass Late(confluent_kafka.KafkaException):\n    pass\n"),
        ("errors.py", "class Base(Exception):\n    pass\n"),
        ("dlq/new.py", "from celery_redis_retry.errors import Base\nclass Deeper(Base):\n    pass\n"),
        ("dlq/other.py", "def f():\n    class Local(Base):\n        pass\n"),
        ("ops.py", "class Plain:\n    pass\nclass Record(Plain):\n    pass\n"),
    ]
    assert exception_classes(sources) == [
        ("bridge/new.py", "Stuck"), ("dlq/new.py", "Deeper"), ("dlq/other.py", "Local"), ("errors.py", "Base"),
        ("kafka/new.py", "Late"),
    ]


def test_errors_py_imports_nothing_heavy() -> None:
    tree = ast.parse(ERRORS.read_text())
    imported = {
        alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names
    } | {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= ERRORS_MAY_IMPORT, imported - ERRORS_MAY_IMPORT


def test_the_packages_that_offer_an_exception_offer_the_one_of_errors_py() -> None:
    from celery_redis_retry import kafka, testing

    assert kafka.KafkaCredentialsError is errors.KafkaCredentialsError
    assert kafka.TopicMissingError is errors.TopicMissingError
    assert testing.HarnessError is errors.HarnessError
    assert testing.ProcessExitedError is errors.ProcessExitedError
    # What they derived from before, where callers catch them so.
    assert issubclass(errors.TargetURLError, ValueError)
    assert issubclass(errors.KafkaCredentialsError, errors.ConfigurationError)
    assert issubclass(errors.SettingsRefusedError, errors.ConfigurationError)
    assert issubclass(errors.HarnessTimeoutError, TimeoutError)
