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


def ended(quotas: SyncQuotas, settings: Settings, charge: Charge) -> None:
    """Release the job's concurrency slot and settle its tokens (idempotent, so once in effect),
    clear its cancel flag and publish its done message: one Redis script."""
    try:
        quotas.settle(
            user_id=charge.user_id,
            job_id=charge.job_id,
            day=charge.day,
            actual=charge.tokens,
            cancel=cancel_key(settings, charge.job_id),
            done=job_done_channel(settings, charge.job_id),
        )
    except redis.RedisError:
        # The reconciler's sweep releases the slot; waiters re-read the job every few seconds.
        log.warning("job.settle_failed", job_id=charge.job_id)
