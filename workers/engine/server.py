"""The engine process: the device, the warm variants and their batchers, and nothing else.

Started by the worker's shell (workers.shell.engine_client) as `python -m workers.engine`, with one
end of a socket pair. No Celery, PostgreSQL or Redis runs here: requests arrive decoded, cancel
flags arrive as messages, deltas and results go back the same way. The torch thread count is
set once, at start, and the threads are this process's own.

The engine lives and dies with its shell: the channel closing (the shell exited or was killed)
ends it at once, and on Linux the kernel kills it too when the shell goes (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import threading
import time
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

import structlog

from core import faults
from core.logging import configure_logging
from core.settings import Settings
from core.variants import load_variants
from workers.engine.device import DeviceThread
from workers.shared.base import Result
from workers.shared.messages import (
    Cancel,
    Deltas,
    Done,
    Drain,
    FromEngine,
    Hello,
    Ready,
    Start,
    States,
    Stop,
    Submit,
)

log = structlog.get_logger(__name__)

PR_SET_PDEATHSIG = 1
# How long a cancel flag for a job this engine never ended is kept (it may still arrive).
CANCEL_TTL_S = 3600.0


def die_with_parent() -> None:
    """Linux: the kernel sends SIGKILL when the process that started this one exits."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the closed channel still ends the engine


class EngineServer:
    def __init__(self, conn: Connection, device: str) -> None:
        self.conn = conn
        self.device = device
        self._send_lock = threading.Lock()
        self._cancels: dict[str, float] = {}  # job id → when its stop was asked
        self._jobs: dict[int, str] = {}  # rid → job id, for requests in hand
        self._late: set[str] = set()  # job ids of requests poisoned late (fault tests only)
        self._stop = threading.Event()
        self.cache: Any = None
        self.faults: Settings | None = None  # the settings, when faults are injected (tests)
        # Every torch call runs on this process's main thread (see workers.engine.device).
        self.device_thread = DeviceThread()

    def send(self, message: FromEngine) -> None:
        try:
            with self._send_lock:
                self.conn.send(message)
        except OSError:  # the shell is gone
            os._exit(0)

    # ---- what the runtime calls ----------------------------------------------------------

    def cancelled(self, job_ids: Any) -> list[float | None]:
        return [self._cancels.get(j) for j in job_ids]

    def publish(self, deltas: Any, progress: Any) -> None:
        self.send(Deltas(list(deltas), dict(progress)))
        if self.faults and any(j in self._late for j in progress):
            faults.crash_here(self.faults, faults.ENGINE_POISON_LATE)

    def send_states(self) -> None:
        if self.cache is None:
            return
        from workers.engine import memory

        self.send(
            States(
                variants=self.cache.report(),
                budget_bytes=self.cache.budget,
                used_bytes=self.cache.used(),
                memory_bytes=memory.allocated(self.device),
            )
        )

    # ---- the channel ---------------------------------------------------------------------

    def serve(self, start: Start) -> None:
        from workers.engine import memory
        from workers.engine.cache import VariantCache
        from workers.engine.loading import load_engine

        settings = start.settings
        self.faults = settings if settings.faults else None
        registry = load_variants(settings.variants_file)
        if settings.kv_cache_mb is not None:
            registry = registry.with_fields(
                kv_cache_mb=settings.kv_cache_mb, kv_cache_mb_cuda=settings.kv_cache_mb
            )
        budget = settings.worker_memory_mb
        self.cache = VariantCache(
            registry,
            device=self.device,
            budget_bytes=budget * memory.MB
            if budget is not None
            else memory.default_budget_bytes(self.device),
            runner=self.device_thread,
            cancelled=self.cancelled,
            load=lambda v: load_engine(v, registry, device=self.device, cache_root=settings.model_cache),
            on_change=self.send_states,
            publish=self.publish,
        )
        reader = threading.Thread(target=self._read, name="engine-channel", daemon=True)
        reader.start()
        self.cache.start(start.names, start.preload)
        self.send_states()
        self.send(Ready())
        # The main thread now runs the device work the batchers and the loader hand in, and
        # reports the cache every heartbeat (memory moves with the batches).
        self.device_thread.serve(self._stop, settings.worker_heartbeat_s, self.send_states)
        closed = threading.Event()

        def close() -> None:
            self.cache.close()  # the batches in hand finish, on this thread
            closed.set()
            self.device_thread.wake()

        threading.Thread(target=close, name="engine-close", daemon=True).start()
        self.device_thread.serve(closed, 1.0, lambda: None)

    def _read(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                os._exit(0)  # the shell is gone: nothing here may outlive it
            if isinstance(message, Submit):
                self._submit(message)
            elif isinstance(message, Cancel):
                self._cancel(message)
            elif isinstance(message, Drain):
                self.cache.drain()
            elif isinstance(message, Stop):
                self._stop.set()
                self.device_thread.wake()

    def _submit(self, message: Submit) -> None:
        if self.faults and faults.POISON in (message.request.prompt or ""):
            faults.crash_here(self.faults, faults.ENGINE_POISON)
        if self.faults and faults.POISON_LATE in (message.request.prompt or ""):
            self._late.add(message.request.job_id)
        self._jobs[message.rid] = message.request.job_id
        future = self.cache.submit(message.variant, message.request)
        future.add_done_callback(lambda f: self._done(message.rid, f))

    def _done(self, rid: int, future: Future[Result]) -> None:
        job_id = self._jobs.pop(rid, None)
        if job_id is not None:
            self._cancels.pop(job_id, None)
        try:
            outcome: Result | BaseException = future.result()
        except BaseException as exc:
            outcome = exc
        self.send(Done.of(rid, outcome))

    def _cancel(self, message: Cancel) -> None:
        now = time.time()
        if len(self._cancels) > 1000:
            self._cancels = {j: t for j, t in self._cancels.items() if now - t < CANCEL_TTL_S}
        self._cancels[message.job_id] = message.at


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workers.engine")
    parser.add_argument("--fd", type=int, required=True, help="this end of the shell's socket pair")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: one per core")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-json", default="1")
    args = parser.parse_args(argv)
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the shell's to handle
    configure_logging(args.log_level, args.log_json == "1")
    conn = Connection(socket.socket(fileno=args.fd).detach())
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    elif device == "cuda":
        device = "cuda:0"
    server = EngineServer(conn, device)
    server.send(Hello(device=device, pid=os.getpid(), threads=torch.get_num_threads()))
    try:
        start = conn.recv()
    except (EOFError, OSError):
        return
    assert isinstance(start, Start), start
    structlog.contextvars.bind_contextvars(worker=start.worker, process="engine")
    log.info("engine.started", pid=os.getpid(), device=device, torch_threads=torch.get_num_threads())
    server.serve(start)
