"""What the `gemmaq` distribution installs: its six packages, all their subpackages, their data files."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL = {"core", "api", "db", "workers", "migrations", "gemmaq"}
PIP_WHEEL = [
    sys.executable,
    "-m",
    "pip",
    "wheel",
    "--no-deps",
    "--no-build-isolation",
    "--no-index",
    "-q",
    "-w",
]


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _declared_packages() -> list[str]:
    packages: list[str] = _pyproject()["tool"]["setuptools"]["packages"]
    return packages


def _source_packages() -> set[str]:
    return {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in TOP_LEVEL
        for init in (ROOT / top).rglob("__init__.py")
        if "__pycache__" not in init.parts
    }


def test_the_package_list_names_every_package() -> None:
    declared = _declared_packages()
    assert len(declared) == len(set(declared))
    assert set(declared) == _source_packages(), "list each package in pyproject's [tool.setuptools] packages"


def test_the_installed_distribution_provides_the_six_names() -> None:
    dist = importlib.metadata.distribution("gemmaq")
    names = set((dist.read_text("top_level.txt") or "").split())
    assert names == TOP_LEVEL
    owners = importlib.metadata.packages_distributions()
    assert {name for name, dists in owners.items() if "gemmaq" in dists} == TOP_LEVEL
    for name in TOP_LEVEL:
        assert set(owners[name]) == {"gemmaq"}, name


def test_the_wheel_holds_the_packages_and_their_data(tmp_path: Path) -> None:
    """Built from a copy of the sources, so the working tree gets no build folder."""
    src = tmp_path / "src"
    for top in TOP_LEVEL:
        shutil.copytree(ROOT / top, src / top, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    built = subprocess.run(
        [*PIP_WHEEL, str(tmp_path / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("gemmaq-*.whl")
    files = set(zipfile.ZipFile(wheel).namelist())

    top_level = {name.split("/")[0] for name in files if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == TOP_LEVEL
    (record,) = (name for name in files if name.endswith(".dist-info/top_level.txt"))
    assert set(zipfile.ZipFile(wheel).read(record).decode().split()) == TOP_LEVEL

    sources = {
        path.relative_to(ROOT).as_posix()
        for top in TOP_LEVEL
        for path in (ROOT / top).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert sources <= files, sorted(sources - files)  # modules, variants.toml, alembic's template, versions
    assert {"core/variants.toml", "core/moderation.toml", "migrations/script.py.mako"} <= files


def test_the_api_and_the_cli_import_nothing_of_the_worker_extra() -> None:
    """`pip install .` (no `worker` extra) serves the API, the CLI and the reconciler."""
    extra = {
        canonicalize_name(Requirement(r).name)
        for r in _pyproject()["project"]["optional-dependencies"]["worker"]
    }
    worker_only = sorted(
        module
        for module, owners in importlib.metadata.packages_distributions().items()
        if "/" not in module and any(canonicalize_name(owner) in extra for owner in owners)
    )
    assert {"torch", "transformers", "safetensors"} <= set(worker_only)
    probe = (
        "import sys, gemmaq.cli, gemmaq.dev, gemmaq.models, gemmaq.compose, gemmaq.client\n"
        "import workers.reconciler\n"
        "from api.app import create_app\n"
        "from core.settings import Settings\n"
        "create_app(Settings())\n"
        f"print(sorted(set({worker_only!r}) & set(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_no_module_of_the_shells_folders_imports_torch() -> None:
    """A path says which process runs a file: the worker shell's modules (workers/*.py,
    workers/shell/, and workers/shared/ that the engine imports too) never load torch or
    transformers, however deep; only workers/engine/ does."""
    workers = ROOT / "workers"
    shell = sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for path in [
            *workers.glob("*.py"),
            *(workers / "shell").glob("*.py"),
            *(workers / "shared").glob("*.py"),
        ]
        if path.name != "__init__.py"
    )
    assert {
        "workers.tasks",
        "workers.shell.pool",
        "workers.shell.engine_client",
        "workers.shared.base",
    } <= set(shell)
    probe = (
        "import importlib, sys\n"
        f"for name in {shell!r}: importlib.import_module(name)\n"
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_moderation_policy_has_one_lookup_and_the_moderations_route_needs_no_submitter() -> None:
    """A user's moderation policy is looked up by core/moderation.py's `policy_for` alone, which
    the API (inputs, /v1/moderations) and the worker shell (outputs) both call; the moderations
    route takes the user and the settings, not the job submitter."""
    import inspect

    from api.routers import moderations

    assert set(inspect.signature(moderations.moderations).parameters) == {"body", "user", "settings"}
    deployment = [
        path.relative_to(ROOT).as_posix()
        for folder in ("api", "core", "workers")
        for path in (ROOT / folder).rglob("*.py")
        if "default_policy(" in path.read_text()
    ]
    assert deployment == ["core/moderation.py"], deployment
    users = sorted(
        path.relative_to(ROOT).as_posix()
        for folder in ("api", "workers")
        for path in (ROOT / folder).rglob("*.py")
        if "policy_for(" in path.read_text()
    )
    # the API's and the shell's start (a policy file that cannot be used stops them), inputs,
    # /v1/moderations, outputs
    assert users == [
        "api/app.py",
        "api/routers/moderations.py",
        "api/submission.py",
        "workers/shell/pool.py",
        "workers/tasks.py",
    ], users
