"""A process's proof of life for container health checks.

A worker shell touches `Settings.health_file` after each heartbeat it publishes to Redis while its
engine serves; the reconciler after each round that reached its stores (Redis; PostgreSQL too
while it holds the duties).
`gemmaq healthy` (a compose health check) then passes while the file is younger than its limit:
a process that hangs, or cannot reach its stores, turns unhealthy without any network call.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from core.settings import Settings


def touch(settings: Settings) -> None:
    """Mark this process alive now (nothing when no health file is set)."""
    if settings.health_file is not None:
        with contextlib.suppress(OSError):  # a health file is never a reason to fail work
            settings.health_file.touch()


def age_s(path: Path) -> float | None:
    """Seconds since the file was last touched; None when it does not exist."""
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None
