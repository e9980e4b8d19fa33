"""Submit, read, list and cancel jobs."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

import structlog
from fastapi import APIRouter, Header, Query, Request, Response, status
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.deps import AutocommitDep, CancelsDep, FlowDep, SubmitterDep, UserDep
from api.errors import responses
from api.middleware import rate_headers
from api.schemas import job_out
from api.streaming import Event, cursor_of
from api.submission import read_job
from core.errors import Conflict, ValidationFailed
from core.schemas import TERMINAL_STATUSES, JobCreate, JobList, JobOut, JobStatus
from db.repo import jobs as jobs_repo

router = APIRouter(tags=["jobs"])
log = structlog.get_logger(__name__)

JobIdPath = Annotated[str, "job id"]


@router.post(
    "/jobs",
    status_code=status.HTTP_202_ACCEPTED,
    responses=responses(401, 403, 404, 409, 413, 415, 422, 429, 503),
    summary="Submit a job",
)
async def create_job(
    request: Request,
    spec: JobCreate,
    response: Response,
    user: UserDep,
    submitter: SubmitterDep,
    idempotency_key: Annotated[str | None, Header(max_length=200, pattern=r"^[\x21-\x7e]+$")] = None,
) -> JobOut:
    """Queue a job. A repeat with the same `Idempotency-Key` and body returns the first job;
    the same key with a different body is a 409. Inline media is checked and stored as files.
    Admission takes one request from the per-minute window, one concurrent-job slot and the
    job's tokens (input estimate + `max_new_tokens`, settled to the real count when it ends)."""
    submitted = await submitter.submit(
        user, spec, idempotency_key=idempotency_key, window_seen=rate_headers(request)
    )
    response.headers["Location"] = f"/v1/jobs/{submitted.job.id}"
    if submitted.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return submitted.job


@router.get("/jobs/{job_id}", responses=responses(401, 404, 422), summary="Read a job")
async def get_job(
    job_id: JobIdPath,
    flow: FlowDep,
    wait: Annotated[float, Query(ge=0, le=60, description="hold up to N seconds for a terminal state")] = 0,
) -> JobOut:
    if wait <= 0:
        return await flow.read(job_id)
    with flow.hold("wait"):
        return await flow.wait(job_id, wait)


@router.get(
    "/jobs/{job_id}/events",
    responses={
        **responses(401, 404, 422),
        200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"},
    },
    response_class=EventSourceResponse,
    summary="Follow a job: status changes and text deltas (Server-Sent Events)",
)
async def job_events(
    job_id: JobIdPath,
    flow: FlowDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=41)] = None,
) -> EventSourceResponse:
    """Events `status` (`{"status": …}`) and `delta` (`{"text": …}`: the next piece of the
    result's text, for text models as they decode), each with an `id`; reconnecting with
    `Last-Event-ID` resumes after it. A last `done` event carries the whole job, then the
    stream ends."""
    cursor = cursor_of(last_event_id)
    job = await flow.read(job_id)  # 404 before the stream starts
    hold = flow.hold("stream")  # 429 past the user's cap
    return flow.stream(hold, lambda follow: _frames(follow(job)), cursor=cursor)


async def _frames(events: AsyncIterator[Event]) -> AsyncIterator[ServerSentEvent]:
    async for e in events:
        yield ServerSentEvent(data=json.dumps(e.data), event=e.event, id=e.id)


@router.get("/jobs", responses=responses(401, 422), summary="List your jobs, newest first")
async def list_jobs(
    user: UserDep,
    autocommit: AutocommitDep,
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    variant: Annotated[str | None, Query(max_length=100)] = None,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
    limit: Annotated[int, Query(ge=1, le=jobs_repo.MAX_PAGE)] = 20,
) -> JobList:
    try:
        position = jobs_repo.decode_cursor(cursor) if cursor else None
    except ValueError as exc:
        raise ValidationFailed("cursor: not a cursor this API handed out", {"cursor": cursor}) from exc
    async with autocommit.connect() as connection:
        page = await jobs_repo.list_jobs(
            session=connection, user_id=user.id, status=status_, variant=variant, cursor=position, limit=limit
        )
    return JobList(
        data=[job_out(j) for j in page.jobs],
        next_cursor=page.next_cursor,
        has_more=page.next_cursor is not None,
    )


@router.post(
    "/jobs/{job_id}/cancel",
    responses={**responses(401, 404, 409), 202: {"model": JobOut, "description": "running: stop requested"}},
    summary="Cancel a queued or running job",
)
async def cancel_job(
    job_id: JobIdPath, response: Response, user: UserDep, autocommit: AutocommitDep, cancels: CancelsDep
) -> JobOut:
    """A queued job ends `cancelled` at once and never runs. A running job is asked to stop
    between decoding steps (202); it ends `cancelled` with its partial output."""
    cancelled = await cancels.queued(user.id, job_id)
    job = await read_job(autocommit, user.id, job_id)
    if cancelled:
        return job
    if job.status in TERMINAL_STATUSES:
        raise Conflict(f"job {job_id!r} is already {job.status}", {"status": job.status})
    await cancels.running(job_id)
    response.status_code = status.HTTP_202_ACCEPTED
    return job
