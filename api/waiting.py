"""`GET /v1/jobs/{id}?wait=N` and chat completions: the done messages workers publish, heard
once per API process.

One pattern subscription per process (`DoneListener`) wakes whichever requests wait on the job
whose message arrives, so a waiting request costs Redis nothing of its own. While the listener is
not subscribed (Redis away, reconnecting), waiters re-read their job every second instead of
every `RECHECK_S`; when it subscribes again, every waiter re-reads (messages may have been missed).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from api.background import Background
from core.keys import job_done_channel
from core.schemas import TERMINAL_STATUSES, JobOut
from core.settings import Settings

log = structlog.get_logger(__name__)

# A waiter re-reads its job besides the done message: after RECHECK_S, then at doubling
# intervals up to RECHECK_MAX_S (a reconnected listener wakes every waiter anyway), so that
# hundreds of long waits do not cost a query each every few seconds.
RECHECK_S = 5.0
RECHECK_MAX_S = 30.0
POLL_S = 1.0  # ... while the listener is not subscribed
RETRY_S = 0.5  # between the listener's attempts to subscribe


class DoneListener(Background):
    task_name = "done-listener"

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self._pattern = job_done_channel(settings, "*")
        self._prefix = len(self._pattern) - 1
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self.subscribed = False

    @contextlib.asynccontextmanager
    async def watch(self, job_id: str) -> AsyncIterator[asyncio.Event]:
        """An event set when the job's done message arrives (or when the listener subscribes
        again); registered before the caller reads the job, so no message falls in between."""
        event = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._waiters.get(job_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[job_id]

    def recheck_s(self, after: float = RECHECK_S) -> float:
        return after if self.subscribed else POLL_S

    async def wait_for(self, job_id: str, read: Callable[[], Awaitable[JobOut]], seconds: float) -> JobOut:
        """The job (`read` reads it) once terminal, or as it is when `seconds` have passed."""
        deadline = time.monotonic() + seconds
        # Watching starts before the first read, so a done message published after it wakes us.
        recheck = RECHECK_S
        async with self.watch(job_id) as finished:
            while True:
                job = await read()
                remaining = deadline - time.monotonic()
                if job.status in TERMINAL_STATUSES or remaining <= 0:
                    return job
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(remaining, self.recheck_s(recheck))):
                        await finished.wait()
                finished.clear()
                recheck = min(2 * recheck, RECHECK_MAX_S)

    async def _run(self) -> None:
        while True:
            try:
                await self._listen()
            except RedisError as exc:
                if self.subscribed:
                    log.warning("job.done_listener_lost", error=type(exc).__name__)
            self.subscribed = False
            await asyncio.sleep(RETRY_S)

    async def _listen(self) -> None:
        pubsub = self.redis.pubsub()
        try:
            await pubsub.psubscribe(self._pattern)
            while True:
                message = await pubsub.get_message(timeout=RECHECK_S)
                if message is None:
                    continue
                if message["type"] == "pmessage":
                    self._wake(_text(message["channel"])[self._prefix :])
                elif message["type"] == "psubscribe":  # Redis confirms: from here on, nothing is missed
                    self.subscribed = True
                    self._wake_all()  # whatever was published while nobody listened
        finally:
            with contextlib.suppress(RedisError):
                await pubsub.aclose()

    def _wake(self, job_id: str) -> None:
        for event in self._waiters.get(job_id, ()):
            event.set()

    def _wake_all(self) -> None:
        for waiters in self._waiters.values():
            for event in waiters:
                event.set()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
