"""Dynamic batching: requests are handed in; one thread per variant runs them.

The variant's `batching` (core/variants.toml) says how. `continuous`: a request joins the
running batch at the next step when a slot is free, a finished one leaves at once (the engine
is a `ContinuousEngine`; a request it cannot decode step by step, one with media on a
multimodal engine, runs in a static batch between two steps). `static`: a batch flushes when it
holds `max_batch_size` requests, or `max_wait_ms` after its latest arrival (at most 4 times
`max_wait_ms` after the first). Either way an idle batcher waits like that for a burst before
it starts; requests that find free slots in a running batch wait for each other the same way
(`max_wait_ms`, or until they fill the slots) and join it together. Engines on one device take
turns on its runner (workers.engine.device): a static batch is one turn; a continuous batch runs
its steps, and between them takes newcomers and hands out deltas and results, on the device's
thread until other work waits for the device.
"""

from __future__ import annotations

import collections
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import cast

import structlog

from core.variants import Batching
from workers.engine.continuous import ContinuousDecoder, ContinuousEngine, fatal
from workers.engine.device import DeviceRunner
from workers.shared.base import (
    CancelCheck,
    Engine,
    Request,
    RequestError,
    Result,
    ShuttingDown,
    StaticEngine,
)

log = structlog.get_logger(__name__)

Item = tuple[Request, "Future[Result]"]
Done = Sequence[tuple[object, Result | Exception]]
Joiner = tuple["Future[Result]", Request, list[int]]
# Text deltas (job id, new text) of continuous batches, published as they come (core/events.py).
# (deltas: (job id, new text), progress: job id → (its prompt's tokens, the tokens its row has
# generated so far))
Publish = Callable[[Sequence[tuple[str, str]], Mapping[str, tuple[int, list[int]]]], None]
_WAKE = object()  # put by `drain` so the loop notices at once
MAX_WAIT_FACTOR = 4
# The longest a continuous batch keeps the device in one turn when nothing else waits for it
# (the engine's heartbeat runs between turns).
TURN_S = 0.5
HELD_POLL_S = 0.01  # how often an idle batch looks again at requests whose grammars compile
DEVICE_FAILED = 70  # the engine process's exit status after an error of the device


def device_failed(variant: str, exc: BaseException) -> None:
    """The device cannot be trusted after this error (CUDA, other than out of memory): the engine
    process exits at once, as on any death of it; its shell starts a new engine and sends it the
    requests in hand, one at a time, so that a request that breaks the device fails alone."""
    log.critical("engine.device_failed", variant=variant, error=type(exc).__name__)
    os._exit(DEVICE_FAILED)


class Batcher:
    def __init__(
        self,
        engine: Engine,
        *,
        batching: Batching,
        max_batch_size: int,
        max_wait_ms: float,
        device: DeviceRunner,
        cancelled: CancelCheck,
        load_ms: float | None = None,
        publish: Publish | None = None,
    ) -> None:
        if batching == "continuous" and not isinstance(engine, ContinuousEngine):
            raise TypeError(
                f"{engine.name}: batching is continuous, but its engine does not decode step by step"
            )
        self.engine = engine
        self.batching = batching
        self.publish = publish
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.device = device
        self.cancelled = cancelled
        self._pending_load_ms = load_ms  # reported once, on the first batch after the load
        self._gather_since: float | None = None  # free slots and too few waiting, since then
        self._held = False  # the last turn ran nothing: what waits has grammars still compiling
        self._queue: queue.Queue[Item | object | None] = queue.Queue()
        self._draining = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{engine.name}", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> Future[Result]:
        future: Future[Result] = Future()
        self._queue.put((request, future))
        return future

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def drain(self) -> None:
        """Start no more batches: the one running finishes, every request still waiting gets
        `ShuttingDown` (its task puts the job back in the queue)."""
        self._draining.set()
        self._queue.put(_WAKE)

    def _collect(self, first: Item | None, have: int = 0) -> list[Item]:
        """Gather up to `max_batch_size` (`have` already in hand): wait `max_wait` past the latest
        arrival (a burst keeps filling the batch), never longer than `MAX_WAIT_FACTOR` times
        `max_wait` in all. The requests that were not cancelled meanwhile are marked running."""
        batch = [first] if first is not None else []
        start = time.monotonic()
        deadline = start + self.max_wait
        while have + len(batch) < self.max_batch_size and not self._draining.is_set():
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get_nowait() if remaining <= 0 else self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)
                break
            if item is not _WAKE:
                batch.append(item)  # type: ignore[arg-type]
                deadline = min(time.monotonic() + self.max_wait, start + self.max_wait * MAX_WAIT_FACTOR)
        return [(r, f) for r, f in batch if f.set_running_or_notify_cancel()]

    def _loop(self) -> None:
        if self.batching == "continuous":
            engine = cast(ContinuousEngine, self.engine)
            while True:  # a bug in the loop fails the requests in hand, never the thread
                stream, waiting = self.device.run(engine.stream), collections.deque[Item]()
                try:
                    self._continuous(engine, stream, waiting)
                    return
                except Exception as exc:
                    log.exception("batcher.failed", variant=self.engine.name)
                    self._deliver([*((f, exc) for _, f in waiting), *((k, exc) for k in stream.abandon())])
        while True:
            first = self._queue.get()
            if first is None:
                return
            if first is _WAKE:
                continue
            batch = self._collect(first)  # type: ignore[arg-type]
            if self._draining.is_set():
                for _, future in batch:
                    future.set_exception(ShuttingDown())
            elif batch:
                self._run(batch)

    def _run(self, batch: list[tuple[Request, Future[Result]]]) -> None:
        requests = [r for r, _ in batch]
        try:
            engine = cast(StaticEngine, self.engine)
            outcomes = self.device.run(lambda: engine.generate(requests, self.cancelled))
        except Exception as exc:
            if fatal(exc):
                device_failed(self.engine.name, exc)
            log.exception("batch.failed", variant=self.engine.name, batch_size=len(batch))
            if len(batch) == 1:
                batch[0][1].set_exception(exc)
                return
            # Isolate the request that broke the batch: the others still get their results.
            for item in batch:
                self._run([item])
            return
        load_ms, self._pending_load_ms = self._pending_load_ms, None
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                outcome.load_ms = load_ms
                future.set_result(outcome)

    # ---- continuous batching ---------------------------------------------------------------

    def _continuous(
        self, engine: ContinuousEngine, stream: ContinuousDecoder, waiting: collections.deque[Item]
    ) -> None:
        while True:
            if not stream.rows and not waiting:  # idle: block, then gather a burst
                first = self._queue.get()
                if first is None:
                    return
                if first is _WAKE:
                    continue
                waiting.extend(self._collect(first))  # type: ignore[arg-type]
            elif self._held:  # nothing runs, and what waits has grammars still compiling
                time.sleep(HELD_POLL_S)
            elif not stream.rows and len(waiting) < stream.free:
                # Every row ended at once (rows of one length): gather a burst before the prefill,
                # as an idle batcher does, rather than run a few rows and splice the others in one
                # by one as their jobs reach the engine.
                waiting.extend(self._collect(None, len(waiting)))
            if self.device.run(lambda: self._turn(engine, stream, waiting)):
                return

    def _turn(
        self, engine: ContinuousEngine, stream: ContinuousDecoder, waiting: collections.deque[Item]
    ) -> bool:
        """Steps of the batch, on the device, until it has no rows and too few are waiting to
        fill it (the batcher's thread then gathers more), other work waits for the device, or
        `TURN_S` has passed. Between two steps the loop takes what arrived, joins newcomers, and
        publishes and delivers on this thread: a hand-over to another thread and back at every
        step left the device idle for 6% of a mixed run. Returns whether the batcher stopped."""
        ends = time.monotonic() + TURN_S
        while True:
            while True:  # whatever arrived, without waiting
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:  # stopped with requests in hand: they go back to the queue
                    self._deliver([(future, ShuttingDown()) for _, future in waiting])
                    self._deliver([(key, ShuttingDown()) for key in stream.abandon()])
                    return True
                if item is not _WAKE and item[1].set_running_or_notify_cancel():  # type: ignore[index]
                    waiting.append(item)  # type: ignore[arg-type]
            if self._draining.is_set():
                while waiting:
                    waiting.popleft()[1].set_exception(ShuttingDown())
            joiners: list[Joiner] = []
            static: list[Item] = []  # requests this engine decodes in a static batch (media)
            gathering = self._gathering(stream, waiting)
            held: list[Item] = []  # their grammars still compile: they keep their place
            while waiting and len(joiners) < stream.free and not gathering:
                request, future = waiting.popleft()
                if future.cancelled():
                    continue
                if not engine.continuous(request):
                    static.append((request, future))
                    continue
                if not engine.ready(request):
                    held.append((request, future))
                    continue
                try:
                    joiners.append((future, request, engine.encode(request)))
                except RequestError as exc:
                    future.set_exception(exc)
            waiting.extendleft(reversed(held))
            self._held = bool(held) and not joiners and not static and not stream.rows
            joined = self._join(stream, joiners)
            self._publish(stream)  # before the results: a job's last delta precedes its end
            self._deliver(joined)
            for start in range(0, len(static), self.max_batch_size):  # between two steps
                self._run(static[start : start + self.max_batch_size])
            if stream.rows:
                stepped = self._step(stream)
                self._publish(stream)
                self._deliver(stepped)
            if not stream.rows and (len(waiting) < stream.free or self._held):
                return False
            if self.device.contended() or time.monotonic() >= ends:
                return False

    def _gathering(self, stream: ContinuousDecoder, waiting: collections.deque[Item]) -> bool:
        """Whether the waiting requests hold off joining the running batch for a step: fewer are
        waiting than there are free slots, and they have waited for a free slot for less than
        `max_wait`. A join costs about a step whatever its size, and the jobs that take freed
        slots reach the engine a few milliseconds apart (the jobs in hand first, then the ones
        whose messages the ended jobs' acks let in), so joining them one group at a time would
        split the batch into groups that each pay for their own join, and keep doing so."""
        if not stream.rows or not waiting or len(waiting) >= stream.free:
            self._gather_since = None  # the clock starts with a request waiting for a free slot
            return False
        now = time.monotonic()
        if self._gather_since is None:
            self._gather_since = now
        if now - self._gather_since < self.max_wait:
            return True
        self._gather_since = None
        return False

    def _publish(self, stream: ContinuousDecoder) -> None:
        deltas, stream.deltas = stream.deltas, []
        progress, stream.progress = stream.progress, {}
        if deltas and self.publish is not None:
            try:
                self.publish(deltas, progress)
            except Exception:
                log.exception("batch.publish_failed", variant=self.engine.name)

    def _join(self, stream: ContinuousDecoder, joiners: list[Joiner]) -> Done:
        if not joiners:
            return []
        try:
            return stream.join(joiners)
        except Exception as exc:  # a join computes nothing: only the newcomers fail
            log.exception("batch.join_failed", variant=self.engine.name, joining=len(joiners))
            return [(future, exc) for future, _, _ in joiners]

    def _step(self, stream: ContinuousDecoder) -> Done:
        """A step; a row whose part of it fails is failed by the decoder alone. What reaches here
        is an error of the device (`fatal`: the engine process exits, and its shell starts a new
        one and sends the requests in hand again) or of the loop itself (every row fails)."""
        try:
            return stream.step(self.cancelled)
        except Exception as exc:
            if fatal(exc):
                device_failed(self.engine.name, exc)
            log.exception("batch.step_failed", variant=self.engine.name, batch_size=len(stream.rows))
            return [(key, exc) for key in stream.abandon()]

    def _deliver(self, done: Done) -> None:
        for key, outcome in done:
            future: Future[Result] = key  # type: ignore[assignment]
            if future.done():  # resolved already (a failure that took the whole batch)
                continue
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
                continue
            if outcome.error is not None:  # failed mid-reply: its tokens were work done
                spent = (outcome.input_tokens, outcome.output_tokens)
                future.set_exception(RequestError(outcome.error, spent))
                continue
            outcome.load_ms, self._pending_load_ms = self._pending_load_ms, None
            future.set_result(outcome)
