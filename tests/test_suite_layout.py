"""The suite's own layout: test modules share code through tests/helpers, never by importing one
another or tests/conftest.py (whose fixtures pytest hands out by name)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

TESTS = Path(__file__).resolve().parent


def imports(tree: ast.Module, package: str) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of every module a parsed file imports, and of every name it imports
    from one (`from tests import test_x` imports the module `tests.test_x`); `package`: the
    file's own, for relative imports."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            yield node.lineno, module
            yield from ((node.lineno, f"{module}.{alias.name}") for alias in node.names)


def forbidden(name: str) -> bool:
    """A test module (tests.test_x, tests.security.test_y) or tests/conftest.py."""
    head, *rest = name.split(".")
    return head == "tests" and any(part.startswith("test_") or part == "conftest" for part in rest)


def violations(source: str, package: str) -> list[str]:
    """Each import statement of `source` that reaches a test module or the conftest, once."""
    found: dict[int, str] = {}
    for line, name in imports(ast.parse(source), package):
        if forbidden(name):
            found.setdefault(line, name)
    return [f"line {line}: {name}" for line, name in sorted(found.items())]


def test_no_module_of_the_suite_imports_a_test_module_or_the_conftest() -> None:
    files = sorted(TESTS.rglob("*.py"))
    assert any(f.name.startswith("test_") and f.parent != TESTS for f in files)  # subfolders are read too
    found = []
    for path in files:
        package = ".".join(path.relative_to(TESTS.parent).parent.parts)
        found += [f"{path.relative_to(TESTS.parent)} {v}" for v in violations(path.read_text(), package)]
    assert not found, "import what test modules share from tests/helpers instead:\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("source", "package"),
    [
        ("from tests.test_batches import line", "tests"),
        ("import tests.test_events", "tests.security"),
        ("from tests.conftest import Stack", "tests"),
        ("from tests import test_text_jobs", "tests"),
        ("from tests.security.test_batches import cpu_seconds", "tests.security"),
        ("from .test_batches import cpu_seconds", "tests.security"),
        ("from ..test_events import sse", "tests.security"),
        ("from .. import conftest", "tests.security"),
        ("def f() -> None:\n    from tests.test_media_admission import audio_job", "tests"),
    ],
)
def test_the_check_sees_each_way_of_importing_a_test_module(source: str, package: str) -> None:
    assert violations(source, package)


@pytest.mark.parametrize(
    "source",
    ["from tests.helpers.stack import Stack, wait_job", "from tests.helpers import media", "import pytest"],
)
def test_the_check_lets_helpers_through(source: str) -> None:
    assert violations(source, "tests") == []


def test_collection_refuses_a_test_without_exactly_one_tier(tmp_path: Path) -> None:
    """The hook of tests/conftest.py, on a folder of its own: tests with no tier, with two, and a
    unit test that starts the stack stop the run before anything runs."""
    (tmp_path / "conftest.py").write_text((TESTS / "conftest.py").read_text())
    (tmp_path / "test_tiers.py").write_text(
        "import pytest\n\n"
        "def test_none() -> None: ...\n\n"
        "@pytest.mark.unit\n@pytest.mark.stack\ndef test_two() -> None: ...\n\n"
        "@pytest.mark.unit\ndef test_unit_on_the_stack(stack: object) -> None: ...\n\n"
        "@pytest.mark.unit\ndef test_one() -> None: ...\n"
    )
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "pytest_timeout", "-m", "unit"]
    env = os.environ | {"PYTHONPATH": str(TESTS.parent), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=50)
    assert done.returncode == pytest.ExitCode.USAGE_ERROR, done.stdout + done.stderr
    refused = [line.split(":")[2] for line in done.stderr.splitlines() if "test_tiers.py::" in line]
    assert refused == ["test_none", "test_two", "test_unit_on_the_stack"], done.stderr
