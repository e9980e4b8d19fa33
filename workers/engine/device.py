"""Where device work runs: loads, warmups, prefills, decoding steps and static batches.

Batchers and the loader decide what runs next, each on a thread of its own; the work itself
runs through a `DeviceRunner`, one piece at a time. In the engine process that is
`DeviceThread`: every torch call on one thread. Measured on a 2-core CPU, the same decoding
steps run 10-15% slower from a second thread than from the one that loaded the model: each
thread that enters an OpenMP parallel region gets a team of its own, and once libgomp manages
more threads than there are CPUs it stops spinning between regions (its throttled spin count)
and puts the team to sleep, to be woken at every region of every step.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol, TypeVar

T = TypeVar("T")
_Work = tuple[Callable[[], object], "Future[object]"]


class DeviceRunner(Protocol):
    def run(self, work: Callable[[], T]) -> T:
        """Run `work` on the device, after the work already handed in; return what it returns.
        Work that runs on the device may itself call `run`: that runs at once."""
        ...

    def contended(self) -> bool:
        """Whether other work is waiting for the device (a batcher that holds it for several
        steps hands it over)."""
        ...


class LockedRunner:
    """Runs work on the calling thread, one piece at a time (tests, tools)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._count = threading.Lock()
        self._waiting = 0

    def run(self, work: Callable[[], T]) -> T:
        with self._count:
            self._waiting += 1
        with self._lock:
            with self._count:
                self._waiting -= 1
            return work()

    def contended(self) -> bool:
        return self._waiting > 0


class DeviceThread:
    """Runs work on the thread that calls `serve` (the engine's main thread), in the order it
    was handed in; `run` from that thread itself runs at once."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[[], object], Future[object]] | None] = (
            queue.SimpleQueue()
        )
        self._owner = threading.get_ident()

    def run(self, work: Callable[[], T]) -> T:
        if threading.get_ident() == self._owner:
            return work()
        future: Future[object] = Future()
        self._queue.put((work, future))
        return future.result()  # type: ignore[return-value]

    def contended(self) -> bool:
        return not self._queue.empty()

    def serve(self, stop: threading.Event, every_s: float, tick: Callable[[], None]) -> None:
        """Run work as it comes until `stop` is set (then `wake`), and `tick` every `every_s`."""
        self._owner = threading.get_ident()
        ticked = time.monotonic()
        while not stop.is_set():
            try:
                item = self._queue.get(timeout=max(0.0, ticked + every_s - time.monotonic()))
            except queue.Empty:
                item = None
            if item is not None:
                work, future = item
                try:
                    future.set_result(work())
                except BaseException as exc:  # the caller gets it
                    future.set_exception(exc)
            if time.monotonic() - ticked >= every_s:
                tick()
                ticked = time.monotonic()

    def wake(self) -> None:
        self._queue.put(None)
