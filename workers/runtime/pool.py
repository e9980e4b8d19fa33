"""The worker's runtime state: its warm variants (workers.runtime.cache), job leases, heartbeat."""

from __future__ import annotations

import contextlib
import json
import math
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future

import redis
import structlog

from core.broker import make_celery, redis_client
from core.events import add_delta
from core.queues import cancel_key, cancel_requested_at, lease_key, message_key, worker_key
from core.quotas import SyncQuotas
from core.settings import Settings
from core.variants import VariantRegistry
from workers.runtime import memory
from workers.runtime.base import Request, Result
from workers.runtime.cache import VariantCache, VariantState
from workers.runtime.loading import load_engine

log = structlog.get_logger(__name__)

# How long a job given up on (timed out) stays on the list the decoding steps check.
ABANDONED_TTL_S = 3600.0

# Delete a lease only if this run still holds it.
_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Renew a lease this run holds; set it again if it vanished (a restarted Redis); never take
# one that another run holds.
_RENEW_LEASE = """
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
if not held then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) return 1 end
return 0
"""


class VariantPool:
    def __init__(self, settings: Settings, registry: VariantRegistry, *, device: str, worker: str) -> None:
        self.settings = settings
        self.registry = registry
        self.device = device
        self.worker = worker
        self.redis = redis_client(settings)
        self.quotas = SyncQuotas(self.redis, settings)
        self._device_lock = threading.Lock()
        budget = settings.worker_memory_mb
        self.cache = VariantCache(
            registry,
            device=device,
            budget_bytes=budget * memory.MB if budget is not None else memory.default_budget_bytes(device),
            device_lock=self._device_lock,
            cancelled=self.cancelled,
            load=lambda v: load_engine(v, registry, device=device, cache_root=settings.model_cache),
            on_change=self._publish,
            publish=self.publish_deltas,
        )
        self._stop = threading.Event()
        # Loaded variants are reported warm only once the Celery consumer takes jobs.
        self.consuming = False
        # Jobs claimed here and not yet finished: their leases are renewed by the heartbeat.
        self._in_hand: dict[str, str] = {}  # job id → this run's lease token
        self._in_hand_lock = threading.Lock()
        self._abandoned: dict[str, float] = {}  # job id → when it was given up (timeout)
        self._abandoned_lock = threading.Lock()
        self._release = self.redis.register_script(_RELEASE_LEASE)
        self._renew = self.redis.register_script(_RENEW_LEASE)
        self.broker = make_celery(settings, name="gemmaq-worker-producer")  # to put jobs back
        self.draining = False
        self._heartbeat = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    # ---- variants (see workers.runtime.cache) ---------------------------------------------

    @property
    def states(self) -> dict[str, VariantState]:
        return self.cache.states

    def start(self, names: Sequence[str], preload: Sequence[str] | None = None) -> None:
        self._heartbeat.start()
        self.cache.start(names, preload)

    def servable(self) -> list[VariantState]:
        """Variants whose jobs this worker takes: warm, or cold and loaded when a job comes."""
        return self.cache.servable()

    def submit(self, variant: str, request: Request) -> Future[Result]:
        """Hand a request to its variant, loading the variant first if it is cold."""
        return self.cache.submit(variant, request)

    def memory_bytes(self) -> int | None:
        return memory.allocated(self.device)

    # ---- what task threads call ----------------------------------------------------------

    def cancelled(self, job_ids: Sequence[str]) -> list[float | None]:
        """Between decoding steps: the cancel flags in Redis, and the jobs given up here."""
        with self._abandoned_lock:
            abandoned = [self._abandoned.get(j) for j in job_ids]
        try:
            values = self.redis.mget([cancel_key(self.settings, j) for j in job_ids])
        except redis.RedisError:
            return abandoned
        return [mine or cancel_requested_at(v) for mine, v in zip(abandoned, values, strict=True)]

    def publish_deltas(self, deltas: Sequence[tuple[str, str]]) -> None:
        """Text generated meanwhile, appended to each job's events (one round trip)."""
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                for job_id, text in deltas:
                    add_delta(pipe, self.settings, job_id, text)
                pipe.execute()
        except redis.RedisError:
            log.warning("job.deltas_failed", jobs=len(deltas))

    def request_cancel(self, job_id: str) -> None:
        """Stop a running request at its next step: a job that timed out here. Remembered in this
        process too, as ending the job clears its flag in Redis before the batch sees it."""
        now = time.time()
        with self._abandoned_lock:
            self._abandoned = {j: t for j, t in self._abandoned.items() if now - t < ABANDONED_TTL_S}
            self._abandoned[job_id] = now
        with contextlib.suppress(redis.RedisError):
            self.redis.set(
                cancel_key(self.settings, job_id), time.time(), ex=self.settings.visibility_timeout_s
            )

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

    def drop_lease(self, job_id: str, token: str) -> None:
        with self._in_hand_lock:
            if self._in_hand.get(job_id) == token:
                del self._in_hand[job_id]
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
        self.cache.drain()

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
            pipe.execute()
        except redis.RedisError:
            log.warning("lease.renew_failed", jobs=len(jobs))

    # ---- heartbeat -----------------------------------------------------------------------

    def _publish(self) -> None:
        variants = self.cache.report()
        for report in variants.values():
            if report["state"] == "warm" and not self.consuming:
                report["state"] = "loading"
        body = {
            "worker": self.worker,
            "host": socket.gethostname(),
            "device": self.device,
            "variants": variants,
            "memory_bytes": self.memory_bytes(),
            "memory_budget_mb": round(self.cache.budget / memory.MB, 1),
            "memory_used_mb": round(self.cache.used() / memory.MB, 1),
            "at": time.time(),
        }
        ttl = max(int(self.settings.worker_heartbeat_s * 3), 2)
        try:
            self.redis.set(worker_key(self.settings, self.worker), json.dumps(body), ex=ttl)
        except redis.RedisError:
            log.warning("worker.heartbeat_failed")

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
        self.cache.close()
        with contextlib.suppress(redis.RedisError):
            self.redis.delete(worker_key(self.settings, self.worker))
