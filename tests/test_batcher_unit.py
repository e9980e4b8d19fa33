"""The continuous batcher's answer to a step that raises: an error of the device (CUDA, other than
out of memory) ends the engine process, so that its shell starts a new one; any other error fails
the rows in hand and the batcher goes on."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from core.schemas import GenerationParams
from workers.engine.batcher import DEVICE_FAILED, Batcher
from workers.engine.continuous import fatal
from workers.engine.device import LockedRunner
from workers.shared.base import Request

pytestmark = pytest.mark.unit


class FailingStream:
    """A running batch whose every step raises `error`."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.rows: list[object] = []
        self.free = 4
        self.deltas: list[tuple[str, str]] = []
        self.progress: dict[str, tuple[int, list[int]]] = {}

    def join(self, entries: Sequence[tuple[object, Request, list[int]]]) -> list[Any]:
        self.rows += [key for key, _, _ in entries]
        return []

    def step(self, cancelled: Any) -> list[Any]:
        raise self.error

    def abandon(self) -> list[object]:
        keys, self.rows = self.rows, []
        return keys


class Engine:
    name = "fake"
    device = "cpu"

    def __init__(self, error: Exception) -> None:
        self.error = error

    def warmup(self) -> None: ...

    def ready(self, request: Request) -> bool:
        return True

    def encode(self, request: Request) -> list[int]:
        return [1, 2, 3]

    def continuous(self, request: Request) -> bool:
        return True

    def stream(self) -> FailingStream:
        return FailingStream(self.error)


def test_which_errors_are_the_devices() -> None:
    assert fatal(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not fatal(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not fatal(RuntimeError("injected: this row's step fails"))


@pytest.mark.parametrize("device_error", [True, False])
def test_a_step_that_raises(monkeypatch: pytest.MonkeyPatch, device_error: bool) -> None:
    exits: list[int] = []
    gone = threading.Event()  # os._exit never returns: the batcher's thread waits here instead

    def exit_(status: int) -> None:
        exits.append(status)
        gone.wait(timeout=30)

    monkeypatch.setattr(os, "_exit", exit_)  # the batcher's, for this test
    error = RuntimeError("CUDA error: device-side assert triggered" if device_error else "a bug")
    batcher = Batcher(Engine(error), batching="continuous", max_batch_size=4, max_wait_ms=1,
                      device=LockedRunner(), cancelled=lambda ids: [None] * len(ids))  # fmt: skip
    try:
        future = batcher.submit(
            Request(job_id="j", messages=None, prompt="hi", params=GenerationParams(max_new_tokens=2))
        )
        if device_error:
            deadline = time.monotonic() + 10
            while not exits and time.monotonic() < deadline:
                time.sleep(0.01)
            assert exits == [DEVICE_FAILED] and not future.done()
        else:
            with pytest.raises(RuntimeError, match="a bug"):
                future.result(timeout=10)
            assert exits == []
    finally:
        gone.set()
        batcher.stop()
