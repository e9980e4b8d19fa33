"""Calls that many task threads make at about the same time, run as one.

A batch's jobs end together, and each task thread then writes its job's outcome. `Grouped` lets
them share the work: a thread that finds no call running runs its own at once; threads that
arrive meanwhile wait, and the next of them runs all the calls waiting by then in one go (one
statement, one Redis script), then hands each its result. Nothing is held back to gather a
group: under light load every call runs alone, as before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class _Call(Generic[T, R]):
    def __init__(self, arg: T) -> None:
        self.arg = arg
        self.ready = threading.Event()
        self.lead = False  # set with `ready` when this thread is to run the waiting calls
        self.result: R | None = None
        self.error: BaseException | None = None

    def outcome(self) -> R:
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]


class Grouped(Generic[T, R]):
    def __init__(self, run: Callable[[list[T]], list[R]]) -> None:
        """`run` takes the arguments of the calls in a group and returns their results in order;
        if it raises, every call of the group raises that."""
        self._run = run
        self._lock = threading.Lock()
        self._waiting: list[_Call[T, R]] = []
        self._running = False

    def __call__(self, arg: T) -> R:
        call: _Call[T, R] = _Call(arg)
        with self._lock:
            self._waiting.append(call)
            call.lead = not self._running
            self._running = True
        if not call.lead:
            call.ready.wait()
            if not call.lead:
                return call.outcome()
        with self._lock:
            group, self._waiting = self._waiting, []
        try:
            results = self._run([c.arg for c in group])
            if len(results) != len(group):
                raise RuntimeError(f"{len(results)} results for {len(group)} calls")
            for c, result in zip(group, results, strict=True):
                c.result = result
        except BaseException as exc:
            for c in group:
                c.error = exc
        finally:
            with self._lock:  # hand over to the first call that arrived meanwhile, if any
                if self._waiting:
                    self._waiting[0].lead = True
                    self._waiting[0].ready.set()
                else:
                    self._running = False
            for c in group:
                if c is not call:
                    c.ready.set()
        return call.outcome()
