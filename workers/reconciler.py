"""The reconciler: PostgreSQL says what should be happening, Redis what is; it mends the difference.

Every `reconcile_interval_s` it
- requeues a running job whose lease stayed gone for `lease_s` (its worker died), or fails it
  after `max_attempts`;
- sends again a queued job whose broker message is gone (the API died between commit and
  send, or Redis restarted empty);
- expires queued jobs past their deadline;
- releases concurrency slots whose job ended without settling, or never got a row.

Each step is a conditional UPDATE or an idempotent settle, so several reconcilers (or a
reconciler racing a worker) never move a job twice. Duplicate messages are harmless: a
worker only claims a queued job.
"""

from __future__ import annotations

import collections
import signal
import threading
import time
from datetime import UTC, datetime, timedelta

import redis
import structlog
from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy.exc import OperationalError

from core import quotas
from core.broker import enqueue_job, make_celery, redis_client
from core.queues import lease_key, message_key
from core.quotas import SyncQuotas
from core.settings import Settings
from db.repo import runs
from db.repo.jobs import charge_of
from db.session import sync_sessionmaker
from workers.outcome import ended
from workers.webhooks import Dispatcher

log = structlog.get_logger(__name__)

# A slot whose job has no row this long after admission belonged to a request that died.
STALE_ADMISSION_MS = 60_000


class Reconciler:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = redis_client(settings)
        self.quotas = SyncQuotas(self.redis, settings)
        self.broker = make_celery(settings, name="gemmaq-reconciler")
        self.maker = sync_sessionmaker(settings.db_url)
        # job id → (attempt, when its lease was first seen missing)
        self._lapsing: dict[str, tuple[int, float]] = {}

    def run_forever(self, stop: threading.Event) -> None:
        log.info("reconciler.started", interval_s=self.settings.reconcile_interval_s)
        waiting = False
        while not stop.is_set():
            try:
                self.once()
                if waiting:
                    log.info("reconciler.resumed")
                waiting = False
            except (OperationalError, redis.RedisError, KombuOperationalError) as exc:
                if not waiting:  # once per outage, not once per round
                    log.warning("reconciler.waiting", error=type(exc).__name__)
                waiting = True
            stop.wait(self.settings.reconcile_interval_s)
        log.info("reconciler.stopped")

    def once(self) -> dict[str, int]:
        counts = {
            "requeued": 0,
            "failed": 0,
            "resent": 0,
            "expired": self._expire(),
            "released": self._release_slots(),
        }
        requeued, failed = self._lost_leases()
        counts["requeued"], counts["failed"] = requeued, failed
        counts["resent"] = self._missing_messages()
        if any(counts.values()):
            log.info("reconciler.mended", **counts)
        return counts

    # ---- running jobs whose worker is gone ----------------------------------------------

    def _lost_leases(self) -> tuple[int, int]:
        with self.maker() as session:
            running = runs.running(session=session)
        if not running:
            self._lapsing.clear()
            return 0, 0
        held = self.redis.mget([lease_key(self.settings, r.id) for r in running])
        now = time.monotonic()
        lapsed = []
        seen = set()
        for job, lease in zip(running, held, strict=True):
            if lease is not None:
                continue
            seen.add(job.id)
            attempt, since = self._lapsing.get(job.id, (job.attempts, now))
            if attempt != job.attempts:  # a new attempt since: start counting again
                attempt, since = job.attempts, now
            self._lapsing[job.id] = (attempt, since)
            if now - since >= self.settings.lease_s:
                lapsed.append(job)
        self._lapsing = {k: v for k, v in self._lapsing.items() if k in seen}
        requeued = failed = 0
        for job in lapsed:
            self._lapsing.pop(job.id, None)
            if job.attempts >= self.settings.max_attempts:
                with self.maker.begin() as session:
                    charge = runs.fail_lost(session=session, job_id=job.id, attempt=job.attempts)
                if charge is not None:
                    failed += 1
                    log.warning("job.failed", job_id=job.id, reason="worker lost", attempts=job.attempts)
                    ended(self.quotas, self.settings, [charge])
                continue
            with self.maker.begin() as session:
                back = runs.requeue_lost(session=session, job_id=job.id, attempt=job.attempts)
            if back is not None:
                requeued += 1
                enqueue_job(self.broker, job_id=back.id, variant=back.variant, priority=back.priority)
                log.warning("job.requeued", job_id=job.id, worker=job.worker, attempts=job.attempts)
        return requeued, failed

    # ---- queued jobs without a message --------------------------------------------------

    def _missing_messages(self) -> int:
        cutoff = datetime.now(UTC) - timedelta(seconds=self.settings.enqueue_grace_s)
        with self.maker() as session:
            queued = runs.queued_before(session=session, cutoff=cutoff)
        if not queued:
            return 0
        markers = self.redis.mget([message_key(self.settings, q.id) for q in queued])
        resent = 0
        per_user: collections.Counter[str] = collections.Counter()
        for job, marker in zip(queued, markers, strict=True):
            if marker is None:
                # Each user's resent jobs, oldest first, take the fair-share steps they were
                # admitted into (core/scheduling.py), so a resent flood stays behind others.
                per_user[job.user_id] += 1
                enqueue_job(
                    self.broker,
                    job_id=job.id,
                    variant=job.variant,
                    priority=job.priority,
                    in_flight=per_user[job.user_id],
                )
                resent += 1
                log.warning("job.resent", job_id=job.id, variant=job.variant)
        return resent

    def _expire(self) -> int:
        with self.maker.begin() as session:
            charges = runs.expire(session=session)
        for charge in charges:
            log.info("job.expired", job_id=charge.job_id)
        if charges:
            ended(self.quotas, self.settings, charges)
        return len(charges)

    # ---- quota slots --------------------------------------------------------------------

    def _release_slots(self) -> int:
        """Slots held by jobs that ended (their worker died before settling) or that never got
        a row (the API died between admission and commit)."""
        pattern = self.settings.key("quota", "*", "active")
        released = 0
        seconds, micros = self.redis.time()  # the clock admission stamped the holders with
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        for key in self.redis.scan_iter(match=pattern, count=200):
            user_id = key.decode().split(":")[-2]
            holders = quotas.parse_holders(self.redis.hgetall(key))
            if not holders:
                continue
            with self.maker() as session:
                jobs = runs.states(session=session, job_ids=list(holders))
            for job_id, holder in holders.items():
                job = jobs.get(job_id)
                if job is not None and job.status in runs.TERMINAL:
                    charge = charge_of(job, just_ended=False)
                    released += self.quotas.settle(
                        user_id=user_id, job_id=job_id, day=charge.day, actual=charge.tokens
                    )
                elif job is None and now_ms - holder.admitted_ms > STALE_ADMISSION_MS:
                    released += self.quotas.settle(user_id=user_id, job_id=job_id, day=holder.day, actual=0)
        return released


def run_reconciler(settings: Settings) -> None:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    dispatcher = Dispatcher(settings).start(stop)  # webhooks, in their own thread
    Reconciler(settings).run_forever(stop)
    dispatcher.join(timeout=settings.webhook_timeout_s + 5)
