"""The reconciler: PostgreSQL says what should be happening, Redis what is; it mends the difference.

Every `reconcile_interval_s` it
- requeues a running job whose lease stayed gone for `lease_s` (its worker died), or fails it
  after `max_attempts`;
- sends again a queued job whose broker message is gone (the API died between commit and
  send, or Redis restarted empty);
- expires queued jobs past their deadline;
- releases concurrency slots whose job ended without settling, or never got a row;
- deletes files past their `expires_at` (with their parts).

Each step is a conditional UPDATE or an idempotent settle, so several reconcilers (or a
reconciler racing a worker) never move a job twice. Duplicate messages are harmless: a
worker only claims a queued job.

`Duties`: every API process, every worker and `gemmaq reconciler` run these rounds and the
webhook dispatcher, and exactly one of them does the work at a time — the one that holds the
duty lock in Redis, renewed every round; when it dies, another takes the lock over within
`DUTY_TTL_S`. A deployment that forgets the reconciler process loses nothing.
"""

from __future__ import annotations

import collections
import contextlib
import signal
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import redis
import structlog
from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy.exc import OperationalError

from core import liveness, quotas
from core.broker import enqueue_again, make_celery, marker_age_s, redis_client
from core.errors import GENERATION_ERROR
from core.keys import active_pattern, duties_key, lease_key, message_key, queue_keys, user_of_active
from core.quotas import SyncQuotas
from core.schemas import TERMINAL_STATUSES
from core.settings import Settings
from db.endings import Ended, JobEnd, end_jobs, ended_of, settle
from db.repo import files as files_repo
from db.repo import responses as responses_repo
from db.repo import runs
from db.session import autocommit_engine, sync_sessionmaker
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

    def once(self) -> dict[str, int]:
        counts = {
            "requeued": 0,
            "failed": 0,
            "resent": 0,
            "expired": self._expire(),
            "released": self._release_slots(),
            "files_deleted": self._delete_expired_files(),
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
                if self._end([_lost(job)])[0] is not None:
                    failed += 1
                    log.warning("job.failed", job_id=job.id, reason="worker lost", attempts=job.attempts)
                continue
            with self.maker.begin() as session:
                back = runs.requeue_lost(session=session, job_id=job.id, attempt=job.attempts)
            if back is not None:
                requeued += 1
                enqueue_again(self.broker, back)
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
        # A queued job's message is in the broker (its marker), or held by a live worker that
        # reserved it and renews its lease; with neither, it is lost. So is a message marked as
        # sent a while ago whose variant's queue is empty while no worker holds it: a worker
        # that died between taking it from the broker and reserving its job took it along.
        leases = self.redis.mget([lease_key(self.settings, q.id) for q in queued])
        unheld = [
            (job, marker)
            for job, marker, lease in zip(queued, markers, leases, strict=True)
            if lease is None
            and (marker is None or (marker_age_s(marker) or 0) > self.settings.enqueue_grace_s)
        ]
        if not unheld:
            return 0
        empty = self._empty_queues({job.variant for job, marker in unheld if marker is not None})
        resent = 0
        per_user: collections.Counter[str] = collections.Counter()
        for job, marker in unheld:
            if marker is None or job.variant in empty:
                # Each user's resent jobs, oldest first, take the fair-share steps they were
                # admitted into (core/scheduling.py), so a resent flood stays behind others.
                per_user[job.user_id] += 1
                enqueue_again(self.broker, job, in_flight=per_user[job.user_id])
                resent += 1
                log.warning("job.resent", job_id=job.id, variant=job.variant)
        return resent

    def _empty_queues(self, variants: set[str]) -> set[str]:
        """Of these variants, those whose broker queue holds no message (every priority step)."""
        if not variants:
            return set()
        names = sorted(variants)
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            for key in queue_keys(self.settings, name):
                pipe.llen(key)
        lengths = pipe.execute()
        steps = len(lengths) // len(names)
        return {name for i, name in enumerate(names) if not any(lengths[i * steps : (i + 1) * steps])}

    def _end(self, ends: list[JobEnd]) -> list[Ended | None]:
        return end_jobs(autocommit_engine(self.settings.db_url), self.redis, self.settings, ends)

    def _expire(self) -> int:
        """Queued jobs past their deadline end `expired` without running."""
        with self.maker() as session:
            due = runs.past_deadline(session=session)
        expired = [e for e in self._end([JobEnd.expire(job_id) for job_id in due]) if e is not None]
        for e in expired:
            log.info("job.expired", job_id=e.job_id)
        return len(expired)

    def _delete_expired_files(self) -> int:
        """Files and stored responses past their retention."""
        with self.maker.begin() as session:
            return files_repo.delete_expired(session=session) + responses_repo.delete_expired(session=session)

    # ---- quota slots --------------------------------------------------------------------

    def _release_slots(self) -> int:
        """Slots held by jobs that ended (their worker died before settling) or that never got
        a row (the API died between admission and commit)."""
        pattern = active_pattern(self.settings)
        released = 0
        seconds, micros = self.redis.time()  # the clock admission stamped the holders with
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        for key in self.redis.scan_iter(match=pattern, count=200):
            user_id = user_of_active(key)
            holders = quotas.parse_holders(self.redis.hgetall(key))
            if not holders:
                continue
            with self.maker() as session:
                jobs = runs.states(session=session, job_ids=list(holders))
            for job_id, holder in holders.items():
                job = jobs.get(job_id)
                if job is not None and job.status in TERMINAL_STATUSES:
                    released += sum(settle(self.redis, self.settings, [ended_of(job, fresh=False)]))
                elif job is None and now_ms - holder.admitted_ms > STALE_ADMISSION_MS:
                    released += self.quotas.settle(user_id=user_id, job_id=job_id, day=holder.day, actual=0)
        return released


def _lost(job: runs.Running) -> JobEnd:
    """A running job whose workers were lost on every attempt ends failed; the lost attempt keeps
    a `job_metrics` row of its own (which worker, how long it held the job)."""
    held_ms = (datetime.now(UTC) - job.started_at).total_seconds() * 1000 if job.started_at else None
    return JobEnd(
        job.id,
        "failed",
        error={"code": GENERATION_ERROR, "message": f"its worker was lost on all {job.attempts} attempts"},
        metrics={"worker": job.worker, "total_ms": held_ms},
        attempt=job.attempts,
    )


# Take the duty lock, or keep it: 1 when this process holds it now.
_HOLD = """
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not held then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0
"""
_LET_GO = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
DUTY_TTL_S = 6.0  # at least: a dead holder's duties are taken over within this (or 3 rounds)


class Duties:
    """The reconciler's rounds and the webhook dispatcher, in two threads of this process, done
    while it holds the duty lock (see the module's docstring)."""

    def __init__(self, settings: Settings, who: str) -> None:
        self.settings = settings
        self.redis = redis_client(settings)
        self.token = f"{who}/{uuid.uuid4().hex}"
        self.key = duties_key(settings)
        self.holding = threading.Event()
        self._hold = self.redis.register_script(_HOLD)
        self._let_go = self.redis.register_script(_LET_GO)
        self._threads: list[threading.Thread] = []

    def start(self, stop: threading.Event) -> Duties:
        for target, name in ((self._reconcile, "duties"), (self._deliver, "webhooks")):
            thread = threading.Thread(target=target, args=(stop,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def join(self, timeout: float) -> None:
        for thread in self._threads:
            thread.join(timeout)

    def _ttl_ms(self) -> int:
        return int(max(3 * self.settings.reconcile_interval_s, DUTY_TTL_S) * 1000)

    def _reconcile(self, stop: threading.Event) -> None:
        reconciler: Reconciler | None = None
        waiting = False
        while not stop.is_set():
            try:
                if self._hold(keys=[self.key], args=[self.token, self._ttl_ms()]):
                    if not self.holding.is_set():
                        log.info("duties.taken", interval_s=self.settings.reconcile_interval_s)
                        self.holding.set()
                    reconciler = reconciler or Reconciler(self.settings)
                    reconciler.once()
                elif self.holding.is_set():
                    log.info("duties.handed_over")
                    self.holding.clear()
                    reconciler = None  # its view of lapsing leases is stale by the time it is back
                if waiting:
                    log.info("duties.resumed")
                waiting = False
                liveness.touch(self.settings)
            except (OperationalError, redis.RedisError, KombuOperationalError) as exc:
                if not waiting:  # once per outage, not once per round
                    log.warning("duties.waiting", error=type(exc).__name__)
                waiting = True
            stop.wait(self.settings.reconcile_interval_s)
        self.holding.clear()
        with contextlib.suppress(redis.RedisError):
            self._let_go(keys=[self.key], args=[self.token])  # the next process takes over at once

    def _deliver(self, stop: threading.Event) -> None:
        Dispatcher(self.settings).run_forever(stop, active=self.holding.is_set)


def run_reconciler(settings: Settings) -> None:
    """`gemmaq reconciler`: the duties alone, in a process of their own."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    duties = Duties(settings, "reconciler").start(stop)
    stop.wait()
    duties.join(timeout=settings.webhook_timeout_s + 5)
