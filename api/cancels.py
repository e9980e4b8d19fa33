"""Cancelling jobs from the API: the jobs, responses and batches routes, and a request whose
jobs are refused part way (api/submission.py `submit_all`), all cancel through here. One per API
process, built in the app's lifespan (`app.state.cancels`)."""

from __future__ import annotations

import structlog
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from starlette.concurrency import run_in_threadpool

from core import cancels
from core.settings import Settings
from db.endings import Ended, JobEnd, end_jobs
from db.session import sync_engine

log = structlog.get_logger(__name__)


class Cancels:
    def __init__(self, *, redis: Redis, sync_redis: SyncRedis, settings: Settings) -> None:
        self.redis = redis
        self.sync_redis = sync_redis  # for end_jobs, which `queued` runs on a pool thread
        self.settings = settings

    async def queued(self, user_id: str, job_id: str) -> bool:
        """End the user's job `cancelled` if it is still queued (it never runs): its slot and
        tokens released, its end recorded (event, metrics) and its waiters woken. False when it
        is not queued (running, ended, or not the user's)."""
        ended = await run_in_threadpool(self._end, JobEnd.cancel(job_id, user_id))
        if ended is None:
            return False
        log.info("job.cancelled", job_id=job_id)
        return True

    async def running(self, job_id: str) -> None:
        """Ask the worker running the job to stop it at its next decoding step (core/cancels.py)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            cancels.ask(pipe, self.settings, job_id)
            await pipe.execute()

    async def either(self, user_id: str, job_id: str) -> bool:
        """Cancel a job however it stands: ended at once if queued (True), else asked to stop."""
        if await self.queued(user_id, job_id):
            return True
        await self.running(job_id)
        return False

    def _end(self, end: JobEnd) -> Ended | None:
        """`end_jobs` (db/endings.py), the one path every job's end takes, on a pool thread."""
        # pool_pre_ping: a connection left stale by a restarted PostgreSQL is replaced, not used.
        return end_jobs(sync_engine(self.settings.db_url), self.sync_redis, self.settings, [end])[0]
