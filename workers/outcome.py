"""After a job reaches a terminal state: settle its quota, clear its cancel flag, wake its waiters.

Shared by the task that ends a job and the reconciler that ends one for a lost worker.
"""

from __future__ import annotations

import redis
import structlog

from core.queues import cancel_key, job_done_channel
from core.quotas import SyncQuotas
from core.settings import Settings
from db.repo.jobs import Charge

log = structlog.get_logger(__name__)


def settle(quotas: SyncQuotas, charge: Charge) -> None:
    """Release the job's concurrency slot and settle its tokens; idempotent, so once in effect."""
    try:
        quotas.settle(user_id=charge.user_id, job_id=charge.job_id, day=charge.day, actual=charge.tokens)
    except redis.RedisError:
        log.warning("quota.settle_failed", job_id=charge.job_id)  # the reconciler's sweep retries


def announce(client: redis.Redis, settings: Settings, job_id: str) -> None:
    try:
        client.delete(cancel_key(settings, job_id))
        client.publish(job_done_channel(settings, job_id), "done")
    except redis.RedisError:
        log.warning("job.announce_failed", job_id=job_id)


def ended_elsewhere(client: redis.Redis, quotas: SyncQuotas, settings: Settings, charge: Charge) -> None:
    """A job that ended without running here (expired, lost, finished by another worker)."""
    settle(quotas, charge)
    announce(client, settings, charge.job_id)
