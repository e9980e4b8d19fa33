"""After a job reaches a terminal state: settle its quota, clear its cancel flag, wake its waiters,
append its terminal event and count it for /metrics.

Shared by the task that ends a job and the reconciler that ends one for a lost worker.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis
import structlog

from core.metrics import record_ended_args
from core.queues import cancel_key, job_done_channel
from core.quotas import Ending, SyncQuotas
from core.settings import Settings
from db.repo.jobs import Charge

log = structlog.get_logger(__name__)


def ended(quotas: SyncQuotas, settings: Settings, charges: Sequence[Charge]) -> None:
    """For each job: release its concurrency slot and settle its tokens (idempotent, so once in
    effect), clear its cancel flag and publish its done message — one Redis script for all."""
    endings = [
        Ending(
            user_id=c.user_id,
            job_id=c.job_id,
            day=c.day,
            actual=c.tokens,
            cancel=cancel_key(settings, c.job_id),
            done=job_done_channel(settings, c.job_id),
        )
        for c in charges
    ]
    try:
        quotas.end(endings)
    except redis.RedisError:
        # The reconciler's sweep releases the slots; waiters re-read their jobs every few seconds.
        log.warning("job.settle_failed", job_ids=[c.job_id for c in charges])
    just_ended = [c.ended for c in charges if c.ended is not None]
    if just_ended:
        try:
            keys, args = record_ended_args(settings, just_ended)
            quotas.record_ended(keys=keys, args=args)
        except redis.RedisError:
            log.warning("job.events_failed", job_ids=[e.job_id for e in just_ended])
