"""The package stays lint-clean (ruff on the whole tree, ``mypy --strict`` on the package),
and the suite's ``slow`` marker stays true (the check in ``tests/conftest.py``).

Part of the suite so that ``make test`` (what CI runs) catches a regression, not only
``tox -e lint``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# ruff and mypy, and pytest on a small suite, in subprocesses.
pytestmark = pytest.mark.slow


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          check=False)


def test_ruff_finds_nothing() -> None:
    done = run("ruff", "check", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_strict_finds_nothing_in_the_package() -> None:
    done = run("mypy")
    assert done.returncode == 0, done.stdout + done.stderr


#: A suite of four tests run under the project's conftest (loaded as a plugin): the three
#: not marked slow each break the rule in one way, the slow one does all and is fine.
MARKER_SUITE = '''
import subprocess
import sys
import time

import conftest
import pytest

conftest.FAST_TEST_LIMIT_S = 0.3  # the same check, with a limit a test can reach quickly


@pytest.fixture(scope="session")
def server():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


@pytest.mark.slow
def test_marked_slow(server):
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    time.sleep(0.5)


def test_starts_a_process():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


def test_uses_a_process_fixture_started_before(server):
    pass


def test_takes_long():
    time.sleep(0.5)
'''


def run_marker_suite(tmp_path: Path, *options: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_marker_suite.py").write_text(MARKER_SUITE)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider", "-c",
         str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path), *options, str(tmp_path / "test_marker_suite.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT / "tests")},
    )


def test_a_run_fails_naming_each_test_that_should_be_marked_slow(tmp_path: Path) -> None:
    done = run_marker_suite(tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, output
    assert "4 passed" in output, output
    section = output.split("tests that must be marked slow", 1)[1].split("mark the file", 1)[0]
    assert "test_starts_a_process: started a process (subprocess.Popen" in section, output
    assert "test_uses_a_process_fixture_started_before: uses fixtures that start processes (server)" in section
    assert "test_marked_slow" not in section, output
    # Time is judged in the quick run only (in the whole suite the servers share the cores).
    assert "test_takes_long" not in section, output
    quick = run_marker_suite(tmp_path, "-m", "not slow")
    output = quick.stdout + quick.stderr
    assert quick.returncode == pytest.ExitCode.TESTS_FAILED, output
    section = output.split("tests that must be marked slow", 1)[1].split("mark the file", 1)[0]
    assert "test_takes_long: took 0.5 s (limit 0.3 s)" in section, output


def test_a_run_of_tests_marked_slow_passes(tmp_path: Path) -> None:
    done = run_marker_suite(tmp_path, "-m", "slow")
    assert done.returncode == pytest.ExitCode.OK, done.stdout + done.stderr
    assert "tests that must be marked slow" not in done.stdout
