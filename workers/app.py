"""The Celery worker shell: starts its engine process, then consumes its variants' queues.

The shell claims jobs, reads their inputs and media, hands them to the engine process
(workers.engine) and writes what comes back; the engine owns the device and the models.
CUDA_VISIBLE_DEVICES is set before the engine starts (the CLI pins it); the shell itself never
imports torch.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

import redis
import structlog
from celery import Celery
from celery.signals import task_received, worker_ready, worker_shutdown, worker_shutting_down

from core.broker import RUN_JOB_TASK, make_celery
from core.settings import Settings
from core.variants import Variant, load_variants
from workers import tasks
from workers.reconciler import Duties
from workers.shell.engine_client import EngineStartFailed
from workers.shell.pool import VariantPool

log = structlog.get_logger(__name__)


def create_worker_app(settings: Settings, ctx: tasks.WorkerContext) -> Celery:
    """The Celery app whose one task runs a job with this worker's context."""
    app = make_celery(settings, name="gemmaq-worker")

    def run_job(job_id: str) -> None:
        tasks.run_job(ctx, job_id)

    app.task(name=RUN_JOB_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)(run_job)
    return app


def default_worker_name(device: str) -> str:
    label = device.replace("cuda:", "gpu").replace(":", "")
    return f"{label}@{socket.gethostname()}"


# Jobs a continuously batched variant holds beyond its slots: ready to join when a row ends.
CONTINUOUS_HEADROOM = 2


def task_threads(variant: Variant, device: str) -> int:
    """Task threads (and so broker messages in hand) for one variant. A text variant batches
    continuously: its slots plus a couple waiting, so a job that arrives later (another user's)
    is not stuck behind a worker-side backlog. Static engines get two batches' worth: while one
    batch runs, the next is claimed and waiting, so the device never idles between batches."""
    if variant.batching == "continuous":
        return variant.batch_size(device) + CONTINUOUS_HEADROOM
    return 2 * variant.batch_size(device)


def run_worker(
    settings: Settings,
    variants: Sequence[str],
    *,
    device: str,
    name: str | None = None,
    preload: Sequence[str] | None = None,
) -> None:
    """Serve `variants`: load those of `preload` (default: all) that fit the memory budget now,
    the others when their first job arrives."""
    registry = load_variants(settings.variants_file)
    unknown = [v for v in (*variants, *(preload or ())) if v not in registry]
    if unknown:
        raise SystemExit(f"unknown variants: {', '.join(unknown)} (known: {', '.join(registry.names())})")
    longest = max(registry.get(v).timeout_s for v in variants)  # type: ignore[union-attr]
    if settings.visibility_timeout_s <= longest:
        raise SystemExit(
            f"GEMMAQ_VISIBILITY_TIMEOUT_S={settings.visibility_timeout_s} must exceed the longest job "
            f"time limit ({longest} s), or the broker would hand running jobs to a second worker"
        )
    pool = VariantPool(settings, registry, device=device, name_for=lambda d: name or default_worker_name(d))
    try:
        pool.start(variants, preload)
    except EngineStartFailed as exc:
        pool.close()
        raise SystemExit(str(exc)) from exc
    name = pool.worker
    structlog.contextvars.bind_contextvars(worker=name)
    duties_stop = threading.Event()
    Duties(settings, name).start(duties_stop)  # reconciling, if no other process does it now
    served = pool.servable()
    if not served:
        log.error("worker.nothing_to_serve", variants=list(variants))
        _idle_until_signal(pool)
        return
    concurrency = sum(task_threads(v, pool.device) for v in served)
    app = create_worker_app(settings, tasks.WorkerContext(pool))

    @worker_ready.connect(weak=False)  # type: ignore[untyped-decorator]
    def _ready(**_: object) -> None:
        pool.mark_consuming()

    @task_received.connect(weak=False)  # type: ignore[untyped-decorator]
    def _received(request: Any = None, **_: object) -> None:
        # A message arrives (before a task thread is free for it): its job is reserved here.
        args = getattr(request, "args", None) or ()
        if request is not None and request.id and args and isinstance(args[0], str):
            pool.reserve(request.id, args[0])

    @worker_shutting_down.connect(weak=False)  # type: ignore[untyped-decorator]
    def _drain(**_: object) -> None:
        # SIGTERM: Celery stops consuming and waits for the tasks in hand. The batch running
        # finishes; jobs waiting for a batch go back to the queue; past the grace period the
        # worker exits anyway and the reconciler requeues what it still held.
        log.info("worker.draining", grace_s=settings.shutdown_grace_s)
        pool.drain()
        timer = threading.Timer(settings.shutdown_grace_s, _give_up, args=(pool,))
        timer.daemon = True
        timer.start()

    @worker_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
    def _stopped(**_: object) -> None:
        pool.consuming = False

    log.info(
        "worker.ready",
        variants=[v.name for v in served],
        warm=[n for n, r in pool.engine.report().items() if r["state"] == "warm"],
        device=pool.device,
        engine_pid=pool.engine.pid,
        concurrency=concurrency,
        memory_budget_mb=round(pool.engine.memory()[1] / 2**20, 1),
    )
    argv = [
        "--quiet",
        "worker",
        "--pool=threads",
        f"--concurrency={concurrency}",
        f"--queues={','.join(v.queue for v in served)}",
        f"--hostname={name}",
        "--without-gossip",
        "--without-mingle",
        f"--loglevel={settings.log_level.upper()}",
    ]
    try:
        # The process owns the warm models; the Celery consumer is disposable. Celery's
        # consumer can die on a broker restart (kombu raises while restoring its unacked
        # messages, and the worker stops); the tasks it held finish, then a new consumer
        # starts here once Redis answers — the models stay loaded.
        while True:
            with contextlib.suppress(SystemExit):
                app.worker_main(argv)
            if pool.draining:
                break
            # Messages it took and never ran go back to the reconciler (their leases let go).
            log.warning("worker.consumer_lost", action="starting a new consumer when Redis answers",
                        let_go=pool.forget_reserved())  # fmt: skip
            _wait_for_redis(pool)
            if pool.draining:
                break
    finally:
        duties_stop.set()
        pool.close()


def _wait_for_redis(pool: VariantPool) -> None:
    while True:
        try:
            if pool.redis.ping():
                return
        except redis.RedisError:
            pass
        time.sleep(1.0)


def _give_up(pool: VariantPool) -> None:
    log.warning("worker.grace_expired", in_hand=len(pool.in_hand()))
    os._exit(1)


def _idle_until_signal(pool: VariantPool) -> None:
    """No variant could load: stay up and report why (no crash loop) until told to stop."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    pool.close()
