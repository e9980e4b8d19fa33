"""The worker shell's runtime state: its engine process (workers.engine), job leases, cancels,
heartbeat. Nothing here imports torch: the models live in the engine."""

from __future__ import annotations

import contextlib
import json
import math
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import redis
import structlog

from core import cancels, liveness, moderation
from core.broker import make_celery, redis_client
from core.events import add_delta
from core.keys import lease_key, message_key, worker_key
from core.quotas import SyncQuotas
from core.settings import Settings
from core.variants import Variant, VariantRegistry
from db.repo import runs
from db.session import sync_sessionmaker
from workers.shared.base import Request, Result
from workers.shell.engine_client import EngineClient
from workers.shell.media_decoding import MediaBudget

log = structlog.get_logger(__name__)

MB = 2**20
# The cancel flags of the jobs in hand are read this often, besides the announcements on the
# cancel channel (which a Redis reconnect may miss).
CANCEL_POLL_S = 0.5

# Delete a lease only if this run still holds it.
_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Renew a lease this run holds: 1; held by another run: 0; gone: -1 — then the heartbeat
# decides whether it may set it again (`_renew_leases`).
_RENEW_LEASE = """
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
if not held then return -1 end
return 0
"""


class VariantPool:
    def __init__(
        self, settings: Settings, registry: VariantRegistry, *, device: str, name_for: Callable[[str], str]
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.redis = redis_client(settings)
        self.quotas = SyncQuotas(self.redis, settings)
        self.engine = EngineClient(
            settings, device=device, name_for=name_for, on_change=self._publish, publish=self.publish_deltas
        )
        self._stop = threading.Event()
        # Loaded variants are reported warm only once the Celery consumer takes jobs.
        self.consuming = False
        # Jobs whose message this worker holds — reserved when it arrived, then claimed — and
        # not yet finished: their leases are renewed by the heartbeat.
        self._in_hand: dict[str, str] = {}  # job id → this run's lease token
        self._attempts: dict[str, int] = {}  # job id → the attempt claimed (absent: reserved only)
        self._reserved: dict[str, str] = {}  # broker message (task id) → the token reserved for it
        # Jobs whose streamed text is checked before it is published (their policy checks outputs).
        self._filters: dict[str, moderation.StreamFilter] = {}
        moderation.policy_for(None, settings)  # a policy file that cannot be used: exit now
        self._in_hand_lock = threading.Lock()
        self.media = MediaBudget(settings.worker_media_mb * 2**20)  # decoded, for the jobs in hand
        self._release = self.redis.register_script(_RELEASE_LEASE)
        self._renew = self.redis.register_script(_RENEW_LEASE)
        self.broker = make_celery(settings, name="gemmaq-worker-producer")  # to put jobs back
        self.draining = False
        self._heartbeat = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self._cancels = threading.Thread(target=self._watch_cancels, name="cancels", daemon=True)

    @property
    def worker(self) -> str:
        """This worker's name (known once the engine has said which device it runs on)."""
        return self.engine.worker

    @property
    def device(self) -> str:
        return self.engine.device

    # ---- variants (kept warm in the engine process) -----------------------------------------

    def start(self, names: Sequence[str], preload: Sequence[str] | None = None) -> None:
        """Start the engine and wait for its preloads; then the heartbeat and the cancel watch."""
        self._heartbeat.start()
        self.engine.start(names, preload)
        self._cancels.start()

    def servable(self) -> list[Variant]:
        """Variants whose jobs this worker takes: warm, or cold and loaded when a job comes."""
        return [
            v
            for name, report in self.engine.report().items()
            if report["state"] != "unavailable" and (v := self.registry.get(name)) is not None
        ]

    def unavailable(self, variant: str) -> str | None:
        """Why this worker cannot run the variant's jobs, or None when it can."""
        report = self.engine.report().get(variant)
        if report is None:
            return "this worker does not serve the variant"
        return str(report["reason"]) if report["state"] == "unavailable" else None

    def would_load(self, variant: str) -> bool:
        """Whether a job of `variant` makes this worker's engine load it (neither warm nor loading)."""
        report = self.engine.report().get(variant)
        return report is not None and report["state"] == "cold"

    def submit(self, variant: str, request: Request) -> Future[Result]:
        """Hand a request to the engine (which loads its variant first if it is cold)."""
        return self.engine.submit(variant, request)

    # ---- what task threads call ----------------------------------------------------------

    def publish_deltas(self, deltas: Sequence[tuple[str, str]]) -> None:
        """Text generated meanwhile, appended to each job's events (one round trip) once the
        job's content filter has passed it; a job whose text trips the filter is stopped."""
        tripped: list[str] = []
        with self._in_hand_lock:
            attempts = dict(self._attempts)
            shown: list[tuple[str, str]] = []
            for job_id, text in deltas:
                watch = self._filters.get(job_id)
                if watch is not None:
                    was = watch.tripped
                    text = watch.feed(text)
                    if watch.tripped is not None and was is None:
                        tripped.append(job_id)
                if text:
                    shown.append((job_id, text))
        for job_id in tripped:
            self.request_cancel(job_id)  # its output is withheld: no need to finish it
        self._add_deltas(shown, attempts)

    def release_held(self, job_id: str) -> None:
        """The job's output has passed the filter: the text still held back is published."""
        with self._in_hand_lock:
            watch = self._filters.pop(job_id, None)
            attempts = dict(self._attempts)
        rest = watch.rest() if watch is not None else ""
        if rest:
            self._add_deltas([(job_id, rest)], attempts)

    def _add_deltas(self, deltas: Sequence[tuple[str, str]], attempts: dict[str, int]) -> None:
        if not deltas:
            return
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for job_id, text in deltas:
                    add_delta(pipe, self.settings, job_id, text, attempts.get(job_id))
                pipe.execute()
        except redis.RedisError:
            log.warning("job.deltas_failed", jobs=len(deltas))

    def request_cancel(self, job_id: str) -> None:
        """Stop a running request at its next step: a job that timed out here."""
        self.engine.cancel(job_id, time.time())

    def spent(self, job_id: str) -> tuple[int, int] | None:
        """The (prompt, generated) tokens the engine last reported for a job whose future is done
        (taken: a second call gives None); None when it reported none."""
        return self.engine.spent(job_id)

    def _watch_cancels(self) -> None:
        """Cancels of the jobs in hand, passed to the engine: announced on the cancel channel
        (at once), and read from their flags every CANCEL_POLL_S (whatever was missed)."""
        polled = 0.0
        while not self._stop.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                cancels.subscribe(pubsub, self.settings)
                while not self._stop.is_set():
                    job_id = cancels.announced(pubsub.get_message(timeout=CANCEL_POLL_S))
                    if job_id is not None and job_id in self.in_hand():
                        self._forward_cancels([job_id])
                    if time.monotonic() - polled >= CANCEL_POLL_S:
                        polled = time.monotonic()
                        self._forward_cancels(list(self.in_hand()))
            except redis.RedisError:
                self._stop.wait(1.0)
            finally:
                with contextlib.suppress(redis.RedisError):
                    pubsub.close()

    def _forward_cancels(self, job_ids: list[str]) -> None:
        for job_id, at in cancels.asked(self.redis, self.settings, job_ids).items():
            self.engine.cancel(job_id, at)

    # ---- leases -------------------------------------------------------------------------

    def take_lease(self, job_id: str) -> str | None:
        """Before the claim: the job's lease, unique to this run, or None when another delivery of
        the same job (here or on another worker) holds it — then this one must leave the job alone.
        From here on the heartbeat keeps the lease alive."""
        token = f"{self.worker}/{uuid.uuid4().hex}"
        try:
            if not self.redis.set(lease_key(self.settings, job_id), token, nx=True, ex=self._lease_ttl()):
                return None
        except redis.RedisError:
            log.warning("lease.set_failed")  # the claim is still safe; the heartbeat sets the lease
        with self._in_hand_lock:
            self._in_hand[job_id] = token
        return token

    def reserve(self, task_id: str, job_id: str) -> None:
        """A job's message has arrived (it may wait a while for a free task thread): the job's
        lease is taken now, and its message marker cleared — from here the lease, renewed by
        the heartbeat, says a live worker holds the job's message. If this worker dies before
        it runs the job, the lease lapses and the reconciler sends the job again."""
        token = self.take_lease(job_id)
        if token is not None:
            self._reserved[task_id] = token
            self.message_taken(job_id)

    def reserved(self, task_id: str) -> str | None:
        """The lease token taken when this message arrived, if one was."""
        return self._reserved.pop(task_id, None)

    def forget_reserved(self) -> int:
        """The Celery consumer ended (it died: a broker failover can make kombu raise while it
        closes) with messages that arrived and never ran: their leases go, or the heartbeat
        would keep renewing them and the reconciler would never send those jobs again (their
        messages sit unacknowledged in the broker until the visibility timeout). Returns how
        many were let go."""
        reserved, self._reserved = self._reserved, {}
        jobs = {token: job_id for job_id, token in self.in_hand().items()}
        for token in reserved.values():
            if token in jobs:
                self.drop_lease(jobs[token], token)
        return len(reserved)

    def note_claimed(self, job_id: str, attempt: int, policy: moderation.Policy | None = None) -> None:
        """The job is claimed at `attempt`; its streamed text goes through `policy`'s output check."""
        with self._in_hand_lock:
            if job_id in self._in_hand:
                self._attempts[job_id] = attempt
                if policy is not None and policy.hold("output"):
                    self._filters[job_id] = moderation.StreamFilter(policy)

    def drop_lease(self, job_id: str, token: str) -> None:
        with self._in_hand_lock:
            if self._in_hand.get(job_id) == token:
                del self._in_hand[job_id]
                self._attempts.pop(job_id, None)
                self._filters.pop(job_id, None)
        with contextlib.suppress(redis.RedisError):
            self._release(keys=[lease_key(self.settings, job_id)], args=[token])

    def release_lease(self, job_id: str) -> None:
        """Let go of a job this worker holds (it is being handed back unstarted)."""
        token = self.in_hand().get(job_id)
        if token is not None:
            self.drop_lease(job_id, token)

    def message_taken(self, job_id: str) -> None:
        """The job is claimed: its broker message has done its work (see core.queues.message_key).
        Also called when a message is dropped unclaimed: the reconciler then sends the job again."""
        with contextlib.suppress(redis.RedisError):
            self.redis.delete(message_key(self.settings, job_id))

    def drain(self) -> None:
        """SIGTERM: no new batches; requests waiting for one go back to the queue unstarted."""
        self.draining = True
        self.engine.drain()

    def in_hand(self) -> dict[str, str]:
        with self._in_hand_lock:
            return dict(self._in_hand)

    def _lease_ttl(self) -> int:
        return max(1, math.ceil(self.settings.lease_s))

    def _renew_leases(self) -> None:
        jobs = self.in_hand()
        if not jobs:
            return
        pipe = self.redis.pipeline(transaction=False)
        for job_id, token in jobs.items():
            self._renew(keys=[lease_key(self.settings, job_id)], args=[token, self._lease_ttl()], client=pipe)
        try:
            replies = pipe.execute()
        except redis.RedisError:
            log.warning("lease.renew_failed", jobs=len(jobs))
            return
        gone = [job_id for job_id, reply in zip(jobs, replies, strict=True) if reply == -1]
        if gone:
            self._lost_leases(gone, jobs)

    def _lost_leases(self, gone: list[str], tokens: dict[str, str]) -> None:
        """Leases that vanished while this worker held them: Redis restarted empty, or was away
        longer than the lease and the reconciler requeued the job. A job still running here at
        the attempt it claimed gets its lease back; one that has left this attempt is let go
        (its run is stopped; its outcome would not be written anyway)."""
        with self._in_hand_lock:
            attempts = {job_id: self._attempts.get(job_id) for job_id in gone}
        claimed = [job_id for job_id, attempt in attempts.items() if attempt is not None]
        ours: set[str] = set()
        if claimed:
            try:
                ours = self._still_ours({job_id: attempts[job_id] or 0 for job_id in claimed})
            except Exception:
                log.warning("lease.check_failed", jobs=len(claimed))
                return  # the next heartbeat asks again
        for job_id in gone:
            if attempts[job_id] is not None and job_id not in ours:
                log.warning("lease.lost", job_id=job_id, attempt=attempts[job_id])
                self.request_cancel(job_id)
                with self._in_hand_lock:
                    if self._in_hand.get(job_id) == tokens[job_id]:
                        del self._in_hand[job_id]
                        self._attempts.pop(job_id, None)
                        self._filters.pop(job_id, None)
                continue
            with contextlib.suppress(redis.RedisError):  # NX: never over another run's lease
                self.redis.set(
                    lease_key(self.settings, job_id), tokens[job_id], nx=True, ex=self._lease_ttl()
                )

    def _still_ours(self, attempts: dict[str, int]) -> set[str]:
        """Of these jobs, those still running on this worker at the attempt it claimed."""
        with sync_sessionmaker(self.settings.db_url)() as session:
            return runs.held_by(session=session, attempts=attempts, worker=self.worker)

    # ---- heartbeat -----------------------------------------------------------------------

    def _publish(self) -> None:
        if not self.worker:  # the engine has not said yet which device it runs on
            return
        variants = self.engine.report()
        for report in variants.values():
            if report["state"] == "warm" and not self.consuming:
                report["state"] = "loading"
        memory_bytes, budget, used = self.engine.memory()
        body = {
            "worker": self.worker,
            "host": socket.gethostname(),
            "device": self.device,
            "variants": variants,
            "memory_bytes": memory_bytes,
            "memory_budget_mb": round(budget / MB, 1),
            "memory_used_mb": round(used / MB, 1),
            "engine_pid": self.engine.pid,
            "at": time.time(),
        }
        ttl = max(int(self.settings.worker_heartbeat_s * 3), 2)
        try:
            self.redis.set(worker_key(self.settings, self.worker), json.dumps(body), ex=ttl)
        except redis.RedisError:
            log.warning("worker.heartbeat_failed")
            return
        if self.consuming:
            liveness.touch(self.settings)

    def mark_consuming(self) -> None:
        self.consuming = True
        self._publish()

    def _beat(self) -> None:
        while not self._stop.is_set():
            self._publish()
            self._renew_leases()
            self._stop.wait(self.settings.worker_heartbeat_s)

    def close(self) -> None:
        self._stop.set()
        self.engine.close()
        for job_id, token in self.in_hand().items():  # messages it held but never ran
            self.drop_lease(job_id, token)
        if self.worker:
            with contextlib.suppress(redis.RedisError):
                self.redis.delete(worker_key(self.settings, self.worker))
