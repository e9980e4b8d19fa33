"""`gemmaq healthy`, the compose health check of workers and the reconciler: it passes while the
process keeps touching its health file, and fails, saying why, once it stops."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from core import liveness
from core.settings import Settings, get_settings
from gemmaq.cli import app

pytestmark = pytest.mark.unit


def healthy(monkeypatch: pytest.MonkeyPatch, path: Path | None, *args: str) -> tuple[int, str]:
    if path is None:
        monkeypatch.delenv("GEMMAQ_HEALTH_FILE", raising=False)
    else:
        monkeypatch.setenv("GEMMAQ_HEALTH_FILE", str(path))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["healthy", *args])
    finally:
        get_settings.cache_clear()
    return result.exit_code, result.output


def test_healthy_follows_the_age_of_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "alive"
    code, said = healthy(monkeypatch, path)
    assert code == 1 and "never touched" in said

    liveness.touch(Settings(health_file=path))
    assert healthy(monkeypatch, path, "--max-age", "30")[0] == 0

    stale = time.time() - 120
    os.utime(path, (stale, stale))
    code, said = healthy(monkeypatch, path, "--max-age", "30")
    assert code == 1 and "120 s old" in said


def test_healthy_without_a_file_set_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    code, said = healthy(monkeypatch, None)
    assert code == 2 and "GEMMAQ_HEALTH_FILE" in said
