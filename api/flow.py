"""What the routes that answer with a caller's jobs share — chat completions, completions,
responses, audio, a job's wait and its events: a place under the caller's cap for the connection
they hold open (api/holds.py), the submission, then the jobs followed as Server-Sent Events or
waited for.

`JobFlow` is built per request from the services on app.state (api/deps.py `FlowDep`), so a
route names only what differs: its spec, its frames, its answer.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine
from sse_starlette import EventSourceResponse, ServerSentEvent

from api import streaming
from api.cancels import Cancels
from api.errors import responses
from api.holds import Hold, Holds, KeyWatch, Kind, guarded
from api.middleware import rate_headers
from api.streaming import Event
from api.submission import Submitter, read_job
from api.waiting import DoneListener
from core.schemas import JobCreate, JobOut
from core.settings import Settings
from db.models import User

INTERACTIVE_PRIORITY = 5  # the OpenAI-shaped routes' jobs: as a job submitted with the default priority
PING_S = 15  # an SSE comment this often keeps idle connections open through proxies
# The OpenAPI answers of the completion routes: their refusals, the completion, or its chunks.
COMPLETION_ANSWERS: dict[int | str, dict[str, Any]] = {
    **responses(401, 403, 409, 413, 415, 422, 429, 502, 503, 504),
    200: {"content": {"text/event-stream": {}}, "description": "the completion, or its chunks streamed"},
}

# A job's events as they come (api/streaming.py `follow`), its re-reads checking the caller's key.
Follow = Callable[[JobOut], AsyncIterator[Event]]


@dataclass(frozen=True)
class JobFlow:
    """One request's caller and the services its jobs go through."""

    request: Request
    user: User
    submitter: Submitter
    cancels: Cancels
    autocommit: AsyncEngine
    redis: Redis
    settings: Settings
    done: DoneListener
    holds: Holds

    def hold(self, kind: Kind, jobs: int = 1) -> Hold:
        """A place for one more stream or wait of the caller per job it follows (429 past their
        cap)."""
        return self.holds.take(kind, self.user.id, jobs)

    @contextlib.contextmanager
    def submitting(self, *, stream: bool, jobs: int = 1) -> Iterator[Hold]:
        """A hold taken before anything is queued (so a refused request queues nothing), for the
        block that submits `jobs` jobs: given back if the block fails, else kept for the stream
        or the wait that follows."""
        hold = self.hold("stream" if stream else "wait", jobs)
        try:
            yield hold
        except BaseException:
            hold.release()
            raise

    async def submit(self, spec: JobCreate) -> JobOut:
        submitted = await self.submitter.submit(self.user, spec, window_seen=rate_headers(self.request))
        return submitted.job

    async def submit_all(self, specs: Sequence[JobCreate]) -> list[JobOut]:
        """The request's jobs, all of them or none (api/submission.py `submit_all`)."""
        return await self.submitter.submit_all(self.user, specs, window_seen=rate_headers(self.request))

    async def read(self, job_id: str) -> JobOut:
        """The caller's job (404 for another's, or none)."""
        return await read_job(self.autocommit, self.user.id, job_id)

    async def wait(self, job_id: str, seconds: float | None = None) -> JobOut:
        """The job once terminal, or as it is when `seconds` (`chat_wait_s` unless given) have
        passed."""
        seconds = self.settings.chat_wait_s if seconds is None else seconds
        return await self.done.wait_for(job_id, functools.partial(self.read, job_id), seconds)

    def stream(
        self,
        hold: Hold,
        frames: Callable[[Follow], AsyncIterator[ServerSentEvent]],
        *,
        headers: dict[str, str] | None = None,
        cursor: str = "0-0",
    ) -> EventSourceResponse:
        """Server-Sent Events under `hold` (given back when the stream ends): the frames that
        `frames` makes of the jobs it follows — their events after `cursor` — while the caller's
        key still holds."""
        watch = KeyWatch(self.request)

        async def read(job_id: str) -> JobOut:
            await watch.check()
            return await self.read(job_id)

        def follow(job: JobOut) -> AsyncIterator[Event]:
            return streaming.follow(self.redis, self.settings, job, functools.partial(read, job.id), cursor)

        return EventSourceResponse(guarded(frames(follow), hold, watch), ping=PING_S, headers=headers)
