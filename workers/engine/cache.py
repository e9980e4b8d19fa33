"""The worker's warm variants: as many resident as its memory budget holds, least recently used
evicted to make room for a variant whose jobs arrive while it is cold.

Every load and eviction runs on one loader thread and on the device's runner, so never in the
middle of a batch; a variant is evicted only while none of its requests is in hand (waiting in
its batcher or running). A job for a cold variant waits for the load, bounded by the job's own
time limit (its task stops waiting); when nothing can be evicted yet, the load waits for a warm
variant to fall idle. Waiting variants are loaded in the order their first jobs arrived.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog

from core.variants import Variant, VariantRegistry, weights_problem
from workers.engine import memory
from workers.engine.batcher import Batcher, Publish
from workers.engine.device import DeviceRunner
from workers.engine.loading import WeightsUnavailable
from workers.shared.base import CancelCheck, Engine, Request, RequestError, Result, ShuttingDown

log = structlog.get_logger(__name__)

State = Literal["cold", "loading", "warm", "unavailable"]


class _Handle(Future[Result]):
    """A request waiting for its variant's load; once handed to the batcher it follows the
    batcher's future, and cancelling it cancels that one if its batch has not started."""

    inner: Future[Result] | None = None

    def cancel(self) -> bool:
        return self.inner.cancel() if self.inner is not None else super().cancel()

    def follow(self, inner: Future[Result]) -> None:
        self.inner = inner
        inner.add_done_callback(self._copy)

    def _copy(self, inner: Future[Result]) -> None:
        if inner.cancelled():
            self.set_exception(CancelledError())
        elif (exc := inner.exception()) is not None:
            self.set_exception(exc)
        else:
            self.set_result(inner.result())


@dataclass
class _Waiting:
    request: Request
    handle: _Handle
    since: float = field(default_factory=time.monotonic)


@dataclass
class VariantState:
    variant: Variant
    state: State = "cold"
    reason: str | None = None
    load_ms: float | None = None
    batcher: Batcher | None = None
    resident_bytes: int | None = None  # measured at its latest load
    last_used: float | None = None  # epoch seconds: its latest request in or result out
    in_use: int = 0  # requests handed to its batcher and not finished
    waiting: list[_Waiting] = field(default_factory=list)  # requests waiting for its load

    @property
    def size(self) -> int:
        """Bytes the budget counts: as measured once loaded, as declared (`memory_mb`) before."""
        return self.resident_bytes if self.resident_bytes is not None else self.variant.memory_mb * memory.MB

    def report(self) -> dict[str, Any]:
        warm = self.state == "warm"
        return {
            "state": self.state,
            "reason": self.reason,
            "last_used_at": self.last_used,
            "resident_mb": _mb(self.resident_bytes) if warm and self.resident_bytes is not None else None,
            "memory_mb": _mb(self.size),
            "load_ms": round(self.load_ms, 1) if self.load_ms is not None else None,
            "adapters": self._adapters(),
        }

    def _adapters(self) -> dict[str, Any] | None:
        """Its LoRA adapter cache (workers.engine.lora), while it is warm and takes adapters."""
        adapters = getattr(self.batcher.engine, "adapters", None) if self.batcher is not None else None
        return adapters.report() if adapters is not None else None


def _mb(n: int) -> float:
    return round(n / memory.MB, 1)


def _failed(exc: Exception) -> Future[Result]:
    future: Future[Result] = Future()
    future.set_exception(exc)
    return future


class VariantCache:
    def __init__(
        self,
        registry: VariantRegistry,
        *,
        device: str,
        budget_bytes: int,
        runner: DeviceRunner,
        cancelled: CancelCheck,
        load: Callable[[Variant], Engine],
        on_change: Callable[[], None] = lambda: None,
        publish: Publish | None = None,
    ) -> None:
        self.registry = registry
        self.device = device
        self.budget = budget_bytes
        self.runner = runner
        self.cancelled = cancelled
        self.publish = publish
        self._load_engine = load
        self._on_change = on_change
        self.states: dict[str, VariantState] = {}
        self._cond = threading.Condition()
        self._stopped = False
        self.draining = False

    # ---- start ---------------------------------------------------------------------------

    def start(self, names: Sequence[str], preload: Sequence[str] | None = None) -> None:
        """Check every variant, load those of `preload` (default: all) that fit, in order; the
        others stay cold until a job asks for them."""
        for name in names:
            variant = self.registry.get(name)
            assert variant is not None, name
            st = self.states[name] = VariantState(variant)
            if st.size > self.budget:
                self._unavailable(st, self._too_big(st))
            elif problem := weights_problem(variant, self.registry):
                self._unavailable(st, problem)
        for name in names if preload is None else [n for n in names if n in preload]:
            st = self.states[name]
            if st.state == "cold" and st.size <= self.budget - self.used():
                with self._cond:
                    st.state = "loading"
                self._on_change()
                self._load(st)
        # The loader logs with the context bound here (the worker's name).
        context = contextvars.copy_context()
        threading.Thread(
            target=context.run, args=(self._loader_loop,), name="variant-loader", daemon=True
        ).start()

    # ---- what task threads call ----------------------------------------------------------

    def submit(self, name: str, request: Request) -> Future[Result]:
        """The request's future: handed to the variant's batcher now if it is warm, else once
        the loader has made it warm. Its variant counts as in use until the future is done."""
        with self._cond:
            st = self.states.get(name)
            if self.draining:
                return _failed(ShuttingDown())
            if st is None or st.state == "unavailable":
                reason = st.reason if st else "this worker does not serve the variant"
                return _failed(RequestError(f"variant unavailable: {reason}"))
            if st.state != "warm":
                waiting = _Waiting(request, _Handle())
                st.waiting.append(waiting)
                self._cond.notify_all()
                return waiting.handle
            batcher = self._take(st)
        return self._send(st, batcher, request)

    def _take(self, st: VariantState) -> Batcher:
        """Under the lock: one more request in hand for a warm variant."""
        assert st.batcher is not None
        st.in_use += 1
        st.last_used = time.time()
        return st.batcher

    def _send(self, st: VariantState, batcher: Batcher, request: Request) -> Future[Result]:
        try:
            future = batcher.submit(request)
        except BaseException:
            self._release(st)
            raise
        future.add_done_callback(lambda _: self._release(st))
        return future

    def _release(self, st: VariantState) -> None:
        with self._cond:
            st.in_use -= 1
            st.last_used = time.time()
            self._cond.notify_all()

    # ---- loader --------------------------------------------------------------------------

    def used(self) -> int:
        with self._cond:
            return sum(s.size for s in self.states.values() if s.state in ("warm", "loading"))

    def _loader_loop(self) -> None:
        while True:
            with self._cond:
                plan = self._plan()
                while plan is None:
                    if self._stopped:
                        return
                    self._cond.wait(timeout=1.0)  # also wakes to drop requests that gave up
                    plan = self._plan()
            target, victims = plan
            self._on_change()
            if victims:
                self._evict(victims, reason=f"least recently used; room for {target.variant.name}")
            self._load(target)

    def _plan(self) -> tuple[VariantState, list[tuple[VariantState, Batcher]]] | None:
        """Under the lock: the cold variant whose jobs have waited longest, and the idle warm
        variants (least recently used first) to evict so it fits; None when there is nothing
        to load, or room cannot be made yet."""
        if self._stopped or self.draining:
            return None
        for st in self.states.values():
            st.waiting = [w for w in st.waiting if not w.handle.done()]  # timed out: cancelled
        asked = [s for s in self.states.values() if s.state == "cold" and s.waiting]
        if not asked:
            return None
        target = min(asked, key=lambda s: s.waiting[0].since)
        if target.size > self.budget:  # measured bigger than declared at its latest load
            self._unavailable(target, self._too_big(target))
            return self._plan()
        idle = [s for s in self.states.values() if s.state == "warm" and s.in_use == 0]
        free = self.budget - self.used()
        victims: list[tuple[VariantState, Batcher]] = []
        for st in sorted(idle, key=lambda s: s.last_used or 0.0):
            if free >= target.size:
                break
            assert st.batcher is not None
            victims.append((st, st.batcher))
            free += st.size
        if free < target.size:
            return None
        for st, _ in victims:
            st.state, st.batcher = "cold", None
        target.state = "loading"
        return target, victims

    def _evict(self, victims: list[tuple[VariantState, Batcher]], *, reason: str) -> None:
        """Stop the victims' batchers and drop them (the last references to their engines),
        then hand the memory back. `victims` is emptied."""
        while victims:
            st, batcher = victims.pop()
            batcher.stop()
            del batcher
            idle_s = time.time() - st.last_used if st.last_used else None
            log.info(
                "variant.evicted",
                variant=st.variant.name,
                reason=reason,
                memory_bytes=st.size,
                idle_s=round(idle_s, 1) if idle_s is not None else None,
            )
        memory.release(self.device)

    def _load(self, st: VariantState) -> None:
        v = st.variant
        # On the device's runner: no batch of any variant runs while weights move in, and the
        # growth of CUDA allocations is this variant's alone.
        engine, reason, load_ms, size = self.runner.run(lambda: self._load_on_device(v))
        if engine is None:
            memory.release(self.device)
            self._unavailable(st, reason)
            return
        batcher = Batcher(
            engine,
            batching=v.batching,
            max_batch_size=v.batch_size(self.device),
            max_wait_ms=v.max_wait_ms,
            device=self.runner,
            cancelled=self.cancelled,
            load_ms=load_ms,
            publish=self.publish,
        )
        del engine
        with self._cond:
            st.state, st.batcher, st.load_ms, st.resident_bytes = "warm", batcher, load_ms, size
            st.last_used = time.time()
            ready = [w for w in st.waiting if w.handle.set_running_or_notify_cancel()]
            st.waiting = []
            for _ in ready:
                self._take(st)
            self._cond.notify_all()
        log.info(
            "variant.loaded",
            variant=v.name,
            device=self.device,
            load_ms=round(load_ms, 1),
            memory_bytes=size,
            declared_mb=v.memory_mb,
            used_mb=_mb(self.used()),
            budget_mb=_mb(self.budget),
        )
        for w in ready:
            w.handle.follow(self._send(st, batcher, w.request))
        self._on_change()

    def _load_on_device(self, v: Variant) -> tuple[Engine | None, str, float, int]:
        memory.release(self.device)
        before = memory.allocated(self.device)
        start = time.perf_counter()
        engine: Engine | None = None
        reason = ""
        try:
            engine = self._load_engine(v)
            engine.warmup()
            memory.freeze()
        except WeightsUnavailable as exc:
            engine, reason = None, str(exc)
        except Exception as exc:
            log.exception("variant.load_failed", variant=v.name)
            engine, reason = None, f"failed to load: {type(exc).__name__}: {exc}"
        load_ms = (time.perf_counter() - start) * 1000
        size = memory.resident_bytes(engine, self.device, before) if engine is not None else 0
        adapters = getattr(engine, "adapters", None)
        if adapters is not None:  # filled after the load, as adapters are asked for: counted now
            size += adapters.budget_bytes
        return engine, reason, load_ms, size

    def _too_big(self, st: VariantState) -> str:
        return (
            f"needs {_mb(st.size):g} MB, more than this worker's memory budget of {_mb(self.budget):g} MB "
            "(GEMMAQ_WORKER_MEMORY_MB)"
        )

    def _unavailable(self, st: VariantState, reason: str) -> None:
        with self._cond:
            st.state, st.reason = "unavailable", reason
            waiting, st.waiting = st.waiting, []
        log.error("variant.unavailable", variant=st.variant.name, reason=reason)
        for w in waiting:
            if w.handle.set_running_or_notify_cancel():
                w.handle.set_exception(RequestError(f"variant unavailable: {reason}"))
        self._on_change()

    # ---- reporting and shutdown ----------------------------------------------------------

    def warm(self) -> list[VariantState]:
        return [s for s in self.states.values() if s.state == "warm"]

    def servable(self) -> list[VariantState]:
        return [s for s in self.states.values() if s.state != "unavailable"]

    def report(self) -> dict[str, dict[str, Any]]:
        with self._cond:
            return {name: s.report() for name, s in self.states.items()}

    def drain(self) -> None:
        """SIGTERM: nothing more loads; requests waiting for a load or a batch go back unstarted."""
        with self._cond:
            self.draining = True
            waiting = [w for s in self.states.values() for w in s.waiting]
            for s in self.states.values():
                s.waiting = []
            batchers = [s.batcher for s in self.states.values() if s.batcher is not None]
            self._cond.notify_all()
        for w in waiting:
            if w.handle.set_running_or_notify_cancel():
                w.handle.set_exception(ShuttingDown())
        for batcher in batchers:
            batcher.drain()

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            batchers = [s.batcher for s in self.states.values() if s.batcher is not None]
            self._cond.notify_all()
        for batcher in batchers:
            batcher.stop()
