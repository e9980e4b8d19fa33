"""The shell's handle on its engine process: start it, feed it, follow it, restart it.

`submit` returns a future per request, as the in-process batcher did; results, deltas and the
cache's state come back on one reader thread. Requests in hand are kept here until their
result arrives, so when the engine dies (SIGKILL, OOM, a CUDA error) nothing is lost: the
reader sees the channel close at once, the variants are reported `loading`, a new engine is
started, and every request in hand is sent to it again. One tenant's request that kills the
engine must not take its batch mates down with it: a request that was in hand at a death is a
suspect, and suspects go back one at a time, each alone among suspects; a suspect that was the
only one in flight when the engine died again fails (it is what kills it), and so does any
request in hand at `MAX_DEATHS` deaths. Text already published as deltas
is not published twice: a request sent again carries the tokens it had generated (its last
deltas' progress), and a continuous decoder goes on from them, so its text starts with what was
published; its deltas are passed on only past what was sent before.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import structlog

from core.settings import Settings
from workers.shared.base import Request, RequestError, Result, ShuttingDown
from workers.shared.messages import (
    Cancel,
    Deltas,
    Done,
    Drain,
    Hello,
    Ready,
    Start,
    States,
    Stop,
    Submit,
    ToEngine,
)

log = structlog.get_logger(__name__)

MAX_DEATHS = 3  # deaths of the engine while it held a request, before that request fails anyway
START_TRIES = 3  # engines that die before they are ready, in a row, before the worker gives up
BACKOFF_S = (0.2, 1.0, 5.0, 15.0, 30.0)
CANCEL_TTL_S = 3600.0


class EngineStartFailed(Exception):
    """The engine process died before it was ready, again and again."""


@dataclass
class _Pending:
    rid: int
    variant: str
    request: Request
    future: Future[Result]
    sent: bool = False
    deaths: int = 0
    solo: bool = False  # sent as the one suspect in flight
    published: int = 0  # characters of its text published as deltas, over all engine lives
    seen: int = 0  # characters of deltas this engine life has produced


class EngineClient:
    def __init__(
        self,
        settings: Settings,
        *,
        device: str,
        name_for: Callable[[str], str],
        on_change: Callable[[], None] = lambda: None,
        publish: Callable[[Sequence[tuple[str, str]]], None] = lambda _: None,
    ) -> None:
        self.settings = settings
        self.device = device  # as asked ("auto", "cpu", "cuda:0"), then as the engine resolved it
        self.worker = ""
        self._name_for = name_for
        self._on_change = on_change
        self._publish = publish
        self._lock = threading.Lock()  # pending, cancels, the channel's state — never held in a send
        self._send_lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._by_job: dict[str, int] = {}
        self._cancels: dict[str, float] = {}
        # job id → (prompt tokens, tokens generated) as last reported: what a job that ends without
        # a result (timed out, failed mid-reply, its engine gone) is charged; taken by `spent`
        self._spent: dict[str, tuple[int, int]] = {}
        self._suspects: collections.deque[int] = collections.deque()  # rids, to be sent one at a time
        self._solo: int | None = None  # the suspect in flight
        self._rids = itertools.count(1)
        self._conn: Connection | None = None  # set while the engine is ready
        self._proc: subprocess.Popen[bytes] | None = None
        self._states: States | None = None
        self._ready_once = threading.Event()
        self._failed: str | None = None
        self._closing = False
        self.draining = False
        self.pid: int | None = None
        self.deaths = 0

    # ---- life ------------------------------------------------------------------------------

    def start(self, names: Sequence[str], preload: Sequence[str] | None) -> None:
        """Start the engine and wait until it has loaded what it preloads."""
        thread = threading.Thread(
            target=self._supervise, args=(list(names), None if preload is None else list(preload)),
            name="engine-supervisor", daemon=True,
        )  # fmt: skip
        thread.start()
        self._ready_once.wait()
        if self._failed:
            raise EngineStartFailed(self._failed)

    def _supervise(self, names: list[str], preload: list[str] | None) -> None:
        """Spawn, read until the channel closes, note the death, spawn again (in this thread:
        PR_SET_PDEATHSIG follows the thread that started the engine, which lives as long as
        the worker)."""
        failures = 0
        while not self._closing:
            began = time.monotonic()
            try:
                conn, proc = self._spawn()
            except OSError as exc:
                log.error("engine.spawn_failed", error=str(exc))
                conn, proc = None, None
            was_ready = self._read(conn, names, preload) if conn is not None else False
            code = _reap(proc)
            if self._closing:
                return
            self._died(code)
            failures = 0 if was_ready and time.monotonic() - began > 60 else failures + 1
            if not self._ready_once.is_set() and failures >= START_TRIES:
                self._failed = f"the engine process died {failures} times before it was ready (exit {code})"
                self._ready_once.set()
                return
            # The variants warm at the death come back warm; the others load on demand.
            if self._states is not None:
                preload = [n for n, r in self._states.variants.items() if r["state"] in ("warm", "loading")]
            time.sleep(BACKOFF_S[min(failures, len(BACKOFF_S)) - 1])

    def _spawn(self) -> tuple[Connection, subprocess.Popen[bytes]]:
        ours, theirs = socket.socketpair()
        command = [
            sys.executable, "-m", "workers.engine", "--fd", str(theirs.fileno()),
            "--device", self.device, "--threads", str(self.settings.engine_threads or 0),
            "--log-level", self.settings.log_level, "--log-json", "1" if self.settings.log_json else "0",
        ]  # fmt: skip
        try:
            # Its own process group: a signal to the shell's group (a terminal's Ctrl-C, a
            # supervisor's SIGTERM) is the shell's to act on; the engine follows the shell.
            proc = subprocess.Popen(command, pass_fds=[theirs.fileno()], process_group=0)
        finally:
            theirs.close()
        self._proc = proc
        return Connection(ours.detach()), proc

    def _read(self, conn: Connection, names: list[str], preload: list[str] | None) -> bool:
        """Handle the engine's messages until the channel closes; True if it became ready."""
        ready = False
        try:
            while True:
                message = conn.recv()
                if isinstance(message, Done):
                    self._done(message)
                elif isinstance(message, Deltas):
                    self._deltas(message.items, message.progress)
                elif isinstance(message, States):
                    self._states = message
                    self._on_change()
                elif isinstance(message, Hello):
                    self.device, self.pid = message.device, message.pid
                    self.worker = self.worker or self._name_for(message.device)
                    structlog.contextvars.bind_contextvars(worker=self.worker)
                    log.info("engine.spawned", pid=message.pid, device=message.device,
                             torch_threads=message.threads)  # fmt: skip
                    self._send(conn, Start(self.settings, self.worker, names, preload))
                elif isinstance(message, Ready):
                    ready = True
                    self._became_ready(conn)
        except (EOFError, OSError):
            pass
        finally:
            with self._lock:
                self._conn = None
            conn.close()
        return ready

    def _became_ready(self, conn: Connection) -> None:
        with self._lock:
            self._conn = conn
            resend = [p for p in self._pending.values() if not p.sent and not p.deaths]
            for p in resend:
                p.sent, p.seen = True, 0
            cancels = dict(self._cancels)
            draining = self.draining
        for p in resend:
            self._send(conn, Submit(p.rid, p.variant, p.request))
        self._send_next_suspect()
        for job_id, at in cancels.items():
            self._send(conn, Cancel(job_id, at))
        if draining:
            self._send(conn, Drain())
        log.info("engine.ready", pid=self.pid, resent=len(resend), suspects=len(self._suspects),
                 restarts=self.deaths)  # fmt: skip
        self._ready_once.set()
        self._on_change()

    def _died(self, code: int | None) -> None:
        """The channel closed: the requests the engine held will be sent to the next one, unless
        it has died running them too often, or the worker is draining."""
        self.deaths += 1
        failed: list[tuple[_Pending, Exception]] = []
        with self._lock:
            for p in list(self._pending.values()):
                if self.draining:
                    failed.append((p, ShuttingDown()))
                    continue
                if not p.sent:
                    continue
                p.deaths += 1
                p.sent = False
                if p.solo or p.deaths >= MAX_DEATHS:
                    message = f"the engine process died {p.deaths} times while running it"
                    failed.append((p, RequestError(message)))
                else:
                    self._suspects.append(p.rid)
            for p, _ in failed:
                self._forget(p)
            self._solo = None
        log.error("engine.died", pid=self.pid, exit_code=code, in_hand=len(self._pending) + len(failed),
                  failed=len(failed), deaths=self.deaths)  # fmt: skip
        for p, exc in failed:
            _settle(p.future, exc)
        self._on_change()

    def close(self) -> None:
        """Stop the engine (its batches are done: the Celery tasks have returned) and wait for it."""
        self._closing = True
        with self._lock:
            conn = self._conn
        if conn is not None:
            self._send(conn, Stop())
        proc = self._proc
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def drain(self) -> None:
        """SIGTERM: the batches running finish; the requests still waiting come back ShuttingDown."""
        with self._lock:
            self.draining = True
            conn = self._conn
            idle = [p for p in self._pending.values() if not p.sent] if conn is None else []
            for p in idle:
                self._forget(p)
        if conn is not None:
            self._send(conn, Drain())
        for p in idle:
            _settle(p.future, ShuttingDown())

    # ---- requests ----------------------------------------------------------------------------

    def submit(self, variant: str, request: Request) -> Future[Result]:
        future: Future[Result] = Future()
        params = request.params
        if params.seed is None and (params.temperature > 0 or params.repetition_penalty != 1.0):
            # Seeded here, so that a run again after an engine death samples the same text.
            request.params = params.model_copy(update={"seed": secrets.randbits(63)})
        with self._lock:
            if self.draining:
                future.set_exception(ShuttingDown())
                return future
            p = _Pending(next(self._rids), variant, request, future)
            self._pending[p.rid] = p
            self._by_job[request.job_id] = p.rid
            conn = self._conn
            p.sent = conn is not None
            cancel = self._cancels.get(request.job_id)
        if conn is not None:
            self._send(conn, Submit(p.rid, variant, request))
            if cancel is not None:
                self._send(conn, Cancel(request.job_id, cancel))
        future.add_done_callback(lambda _: self._drop(p.rid))
        return future

    def spent(self, job_id: str) -> tuple[int, int] | None:
        """The (prompt, generated) tokens last reported for the job, taken. Called once its future
        is done, whatever its outcome: the future's end forgets the job first, so no later report
        adds it back."""
        with self._lock:
            return self._spent.pop(job_id, None)

    def cancel(self, job_id: str, at: float) -> None:
        """Stop the job's row at the engine's next step (kept for an engine started later)."""
        now = time.time()
        with self._lock:
            if self._cancels.get(job_id) is not None:
                return
            if len(self._cancels) > 1000:
                self._cancels = {j: t for j, t in self._cancels.items() if now - t < CANCEL_TTL_S}
            self._cancels[job_id] = at
            conn = self._conn if job_id in self._by_job else None
        if conn is not None:
            self._send(conn, Cancel(job_id, at))

    def _send(self, conn: Connection, message: ToEngine) -> None:
        try:
            with self._send_lock:
                conn.send(message)
        except OSError:
            pass  # the engine died: the reader sees it, and the request is sent to the next one

    def _done(self, message: Done) -> None:
        with self._lock:
            p = self._pending.get(message.rid)
            if p is not None:
                self._forget(p)
        if p is not None:
            _settle(p.future, message.outcome())
        self._send_next_suspect()

    def _drop(self, rid: int) -> None:
        """A future done here (a result, or given up by its task): nothing to resend."""
        with self._lock:
            p = self._pending.get(rid)
            if p is not None:
                self._forget(p)
        self._send_next_suspect()

    def _send_next_suspect(self) -> None:
        """Send the next suspect, if none is in flight and the engine is ready."""
        with self._lock:
            conn = self._conn
            if conn is None or self._solo is not None:
                return
            while self._suspects:
                p = self._pending.get(self._suspects.popleft())
                if p is not None:
                    break
            else:
                return
            p.sent, p.seen, p.solo = True, 0, True
            self._solo = p.rid
        self._send(conn, Submit(p.rid, p.variant, p.request))

    def _forget(self, p: _Pending) -> None:
        """Under the lock."""
        self._pending.pop(p.rid, None)
        if self._solo == p.rid:
            self._solo = None
        if self._by_job.get(p.request.job_id) == p.rid:
            del self._by_job[p.request.job_id]
            self._cancels.pop(p.request.job_id, None)

    def _deltas(self, items: list[tuple[str, str]], progress: dict[str, tuple[int, list[int]]]) -> None:
        out = []
        with self._lock:
            for job_id, (read, tokens) in progress.items():
                rid = self._by_job.get(job_id)
                if rid is not None and (q := self._pending.get(rid)) is not None:
                    q.request.resume_tokens = tokens  # where it picks up if this engine dies
                    self._spent[job_id] = (read, len(tokens))
            for job_id, text in items:
                rid = self._by_job.get(job_id)
                p = self._pending.get(rid) if rid is not None else None
                if p is None:
                    continue
                start, p.seen = p.seen, p.seen + len(text)
                if p.seen > p.published:  # past what an earlier engine life published
                    out.append((job_id, text[max(0, p.published - start) :]))
                    p.published = p.seen
        if out:
            self._publish(out)

    # ---- what /v1/models shows ------------------------------------------------------------

    def report(self) -> dict[str, dict[str, Any]]:
        """Each variant's state; while the engine is down or starting, the ones it can serve
        are `loading`."""
        states = self._states
        if states is None:
            return {}
        with self._lock:
            up = self._conn is not None
        variants = {name: dict(r) for name, r in states.variants.items()}
        if not up:
            for report in variants.values():
                if report["state"] != "unavailable":
                    report["state"] = "loading"
        return variants

    def memory(self) -> tuple[int | None, int, int]:
        """(device bytes torch holds, memory budget, budget used), as the engine last reported."""
        states = self._states
        if states is None:
            return None, 0, 0
        return states.memory_bytes, states.budget_bytes, states.used_bytes

    def in_hand(self) -> int:
        with self._lock:
            return len(self._pending)


def _settle(future: Future[Result], outcome: Result | Exception) -> None:
    with contextlib.suppress(InvalidStateError):  # its task gave up on it (a timeout)
        if isinstance(outcome, Exception):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


def _reap(proc: subprocess.Popen[bytes] | None) -> int | None:
    if proc is None:
        return None
    try:
        return proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # the channel closed but the process hangs on
        proc.kill()
        return proc.wait()
