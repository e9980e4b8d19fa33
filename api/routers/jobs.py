"""Submit, read, list and cancel jobs."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated

import structlog
from fastapi import APIRouter, Header, Query, Request, Response, status
from redis.exceptions import RedisError
from sqlalchemy import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker
from sse_starlette import EventSourceResponse, ServerSentEvent

from api import quota as admission
from api.deps import (
    AutocommitDep,
    BrokerDep,
    DoneDep,
    FleetDep,
    QuotasDep,
    RedisDep,
    SessionMakerDep,
    SettingsDep,
    UserDep,
    VariantsDep,
)
from api.errors import responses
from api.fleet import availability
from api.fleet_view import FleetView
from api.media import NO_MEDIA, MediaTotals, check_parts, inspect_inline, store_media
from api.streaming import cursor_of, follow
from core import faults
from core.broker import send_job
from core.errors import Conflict, NotFound, PayloadTooLarge, Unavailable, UnknownVariant, ValidationFailed
from core.metrics import record_ended
from core.queues import cancel_key, job_done_channel
from core.schemas import TERMINAL_STATUSES, JobCreate, JobList, JobOut, JobStatus
from core.settings import Settings
from core.variants import Variant, VariantRegistry
from db.ids import new_id
from db.repo import jobs as jobs_repo

router = APIRouter(tags=["jobs"])
log = structlog.get_logger(__name__)

JobIdPath = Annotated[str, "job id"]


# A token is at least ~1 character; input far past the variant's token cap is refused here,
# the exact token count is checked by the worker's tokenizer.
CHARS_PER_TOKEN_CEILING = 8
WHISPER_WINDOW_S = 29.0  # one 30 s window, less the silence the engine puts around the clips
PING_S = 15  # an SSE comment this often keeps idle connections open through proxies
WAIT_RECHECK_S = 5.0  # ?wait=N: how often a waiting request re-reads its job besides the done message


async def _check_spec(
    spec: JobCreate, variants: VariantRegistry, fleet: FleetView, settings: Settings
) -> Variant:
    variant = variants.get(spec.variant)
    if variant is None:
        raise UnknownVariant(
            f"unknown variant {spec.variant!r}", {"variant": spec.variant, "variants": variants.names()}
        )
    if spec.task not in variant.tasks:
        serving = variants.serving(spec.task)
        raise ValidationFailed(
            f"variant {variant.name!r} does not serve task {spec.task!r}; variants that do: {serving}",
            {"variant": variant.name, "task": spec.task, "variants": serving},
        )
    if "max_new_tokens" not in spec.params.model_fields_set:  # the default fits every variant
        spec.params.max_new_tokens = min(spec.params.max_new_tokens, variant.max_new_tokens)
    if spec.params.timeout_s is not None and spec.params.timeout_s > variant.timeout_s:
        raise ValidationFailed(
            f"params.timeout_s: at most {variant.timeout_s} for {variant.name}",
            {"timeout_s": spec.params.timeout_s, "limit": variant.timeout_s},
        )
    if spec.expires_at is not None and spec.expires_at.tzinfo is None:
        raise ValidationFailed("expires_at: give a time zone (e.g. 2026-01-01T00:00:00Z)")
    if spec.expires_at is not None and spec.expires_at <= datetime.now(UTC):
        raise ValidationFailed("expires_at: already past", {"expires_at": spec.expires_at.isoformat()})
    if spec.params.max_new_tokens > variant.max_new_tokens:
        raise ValidationFailed(
            f"params.max_new_tokens: at most {variant.max_new_tokens} for {variant.name}",
            {"max_new_tokens": spec.params.max_new_tokens, "limit": variant.max_new_tokens},
        )
    budget = variant.max_input_tokens * CHARS_PER_TOKEN_CEILING
    if spec.input.chars() > budget:
        raise PayloadTooLarge(
            f"input is {spec.input.chars()} characters; "
            f"{variant.name} takes at most {variant.max_input_tokens} tokens",
            {"characters": spec.input.chars(), "max_input_tokens": variant.max_input_tokens},
        )
    check_parts(spec, variant, settings, variants)
    if variant.engine == "whisper" and spec.params.audio_task == "translate":
        target = (spec.params.target_language or "english").lower()
        if variant.ct2_model == "whisper-tiny-en" or target not in ("en", "english"):
            raise ValidationFailed(
                f"{variant.name} cannot translate into {spec.params.target_language or 'English'}: "
                "Whisper translates into English only (whisper-tiny-en not at all)",
                {"variant": variant.name, "target_language": spec.params.target_language},
            )
    problem = availability(variant, variants, await fleet.workers())
    if problem is not None:  # refused only on a fresh read of the heartbeats
        problem = availability(variant, variants, await fleet.workers(fresh=True))
    if problem is not None:
        raise Unavailable(f"variant {variant.name!r} cannot run here: {problem}", {"variant": variant.name})
    return variant


class _Replay(Exception):
    """The Idempotency-Key was taken meanwhile: roll back what this request wrote, answer the first job."""

    def __init__(self, job: RowMapping) -> None:
        self.job = job


async def _read(autocommit: AsyncEngine, user_id: str, job_id: str) -> JobOut:
    async with autocommit.connect() as connection:
        job = await jobs_repo.get_job(session=connection, user_id=user_id, job_id=job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    return jobs_repo.job_out(job)


@router.post(
    "/jobs",
    status_code=status.HTTP_202_ACCEPTED,
    responses=responses(401, 403, 404, 409, 413, 415, 422, 429, 503),
    summary="Submit a job",
)
async def create_job(
    spec: JobCreate,
    request: Request,
    response: Response,
    user: UserDep,
    quota: QuotasDep,
    maker: SessionMakerDep,
    autocommit: AutocommitDep,
    broker: BrokerDep,
    redis: RedisDep,
    fleet: FleetDep,
    settings: SettingsDep,
    variants: VariantsDep,
    idempotency_key: Annotated[str | None, Header(max_length=200, pattern=r"^[\x21-\x7e]+$")] = None,
) -> JobOut:
    """Queue a job. A repeat with the same `Idempotency-Key` and body returns the first job;
    the same key with a different body is a 409. Inline media is checked and stored as files.
    Admission takes one request from the per-minute window, one concurrent-job slot and the
    job's tokens (input estimate + `max_new_tokens`, settled to the real count when it ends)."""
    limits = admission.limits_of(user, settings)
    admission.check_variant(limits, spec.variant)
    variant = await _check_spec(spec, variants, fleet, settings)
    request_hash = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()
    if idempotency_key is not None:
        async with autocommit.connect() as connection:
            earlier = await jobs_repo.find_idempotent(
                session=connection, user_id=user.id, idempotency_key=idempotency_key
            )
        if earlier is not None:
            return await _replay(earlier, request_hash, response, autocommit, user.id)
    inline = await inspect_inline(spec, settings)
    job_id = new_id("job")
    reservation: admission.Reservation | None = None

    async def admit(media: MediaTotals) -> admission.Reservation:
        nonlocal reservation
        reservation = await admission.admit(
            request=request, maker=maker, quota=quota, limits=limits, user=user, job_id=job_id, spec=spec,
            media=media,
        )  # fmt: skip
        return reservation

    async def insert(db: AsyncSession | AsyncConnection, granted: admission.Reservation) -> RowMapping:
        job, created = await jobs_repo.create_job(
            session=db, user_id=user.id, spec=spec, idempotency_key=idempotency_key,
            request_hash=request_hash, job_id=job_id, charged_on=granted.day, reserved_tokens=granted.tokens,
        )  # fmt: skip
        if not created:
            raise _Replay(job)
        return job

    try:
        if spec.input.media():  # its files and its row: one transaction
            async with maker() as session, session.begin():
                media = await store_media(
                    session=session, user_id=user.id, spec=spec, inline=inline,
                    max_audio_seconds=WHISPER_WINDOW_S if variant.engine == "whisper" else None,
                )  # fmt: skip
                job = await insert(session, await admit(media))
        else:  # its row alone: one statement
            granted = await admit(NO_MEDIA)
            async with autocommit.connect() as connection:
                job = await insert(connection, granted)
    except BaseException as exc:
        if reservation is not None:  # nothing was queued: the slot and the tokens go back
            await admission.release(quota, user.id, reservation)
        if isinstance(exc, _Replay):
            return await _replay(exc.job, request_hash, response, autocommit, user.id)
        raise
    assert reservation is not None
    structlog.contextvars.bind_contextvars(job_id=job_id, variant=spec.variant)
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    faults.crash_here(settings, faults.API_AFTER_COMMIT)
    try:
        await _enqueue_or_withdraw(
            maker, redis, broker, job_id, spec.variant, spec.priority, reservation.in_flight
        )
    except Unavailable:
        await admission.release(quota, user.id, reservation)
        raise
    log.info("job.queued", task=spec.task, priority=spec.priority, media=len(spec.input.media()))
    return jobs_repo.job_out(job)


async def _replay(
    job: RowMapping, request_hash: str, response: Response, autocommit: AsyncEngine, user_id: str
) -> JobOut:
    if job["request_hash"] != request_hash:
        raise Conflict(
            "this Idempotency-Key was used for a different request",
            {"idempotency_key": job["idempotency_key"], "job_id": job["id"]},
        )
    response.headers["Location"] = f"/v1/jobs/{job['id']}"
    response.headers["Idempotent-Replayed"] = "true"
    return await _read(autocommit, user_id, job["id"])


async def _enqueue_or_withdraw(
    maker: async_sessionmaker[AsyncSession],
    redis: RedisDep,
    broker: BrokerDep,
    job_id: str,
    variant: str,
    priority: int,
    in_flight: int,
) -> None:
    """Enqueue after commit. If the broker is down the job is withdrawn and the caller told 503 —
    unless a worker has taken it meanwhile (the message went out after all): then it stands."""
    try:
        await send_job(redis, broker, job_id=job_id, variant=variant, priority=priority, in_flight=in_flight)
    except Exception as exc:
        log.error("job.enqueue_failed", error=type(exc).__name__)
        async with maker() as session, session.begin():
            withdrawn = await jobs_repo.withdraw(session=session, job_id=job_id)
        if withdrawn:
            raise Unavailable("the job queue is not answering; retry shortly") from exc


@router.get("/jobs/{job_id}", responses=responses(401, 404, 422), summary="Read a job")
async def get_job(
    job_id: JobIdPath,
    user: UserDep,
    autocommit: AutocommitDep,
    done: DoneDep,
    wait: Annotated[float, Query(ge=0, le=60, description="hold up to N seconds for a terminal state")] = 0,
) -> JobOut:
    if wait <= 0:
        return await _read(autocommit, user.id, job_id)
    deadline = time.monotonic() + wait
    # Watching starts before the first read, so a done message published after it wakes us.
    async with done.watch(job_id) as finished:
        while True:
            job = await _read(autocommit, user.id, job_id)
            remaining = deadline - time.monotonic()
            if job.status in TERMINAL_STATUSES or remaining <= 0:
                return job
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, done.recheck_s())):
                    await finished.wait()
            finished.clear()


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
    user: UserDep,
    autocommit: AutocommitDep,
    redis: RedisDep,
    settings: SettingsDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=41)] = None,
) -> EventSourceResponse:
    """Events `status` (`{"status": …}`) and `delta` (`{"text": …}`: the next piece of the
    result's text, for text models as they decode), each with an `id`; reconnecting with
    `Last-Event-ID` resumes after it. A last `done` event carries the whole job, then the
    stream ends."""
    cursor = cursor_of(last_event_id)
    job = await _read(autocommit, user.id, job_id)  # 404 before the stream starts

    async def frames() -> AsyncIterator[ServerSentEvent]:
        reread = functools.partial(_read, autocommit, user.id, job_id)
        async for e in follow(redis, settings, job, reread, cursor):
            yield ServerSentEvent(data=json.dumps(e.data), event=e.event, id=e.id)

    return EventSourceResponse(frames(), ping=PING_S)


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
        data=[jobs_repo.job_out(j) for j in page.jobs],
        next_cursor=page.next_cursor,
        has_more=page.next_cursor is not None,
    )


@router.post(
    "/jobs/{job_id}/cancel",
    responses={**responses(401, 404, 409), 202: {"model": JobOut, "description": "running: stop requested"}},
    summary="Cancel a queued or running job",
)
async def cancel_job(
    job_id: JobIdPath,
    response: Response,
    user: UserDep,
    quota: QuotasDep,
    maker: SessionMakerDep,
    autocommit: AutocommitDep,
    redis: RedisDep,
    settings: SettingsDep,
) -> JobOut:
    """A queued job ends `cancelled` at once and never runs. A running job is asked to stop
    between decoding steps (202); it ends `cancelled` with its partial output."""
    async with maker() as session, session.begin():
        cancelled = await jobs_repo.cancel_queued(session=session, user_id=user.id, job_id=job_id)
    if cancelled is not None:
        await admission.release(quota, user.id, cancelled)
        await _record_ended(redis, settings, cancelled)
    job = await _read(autocommit, user.id, job_id)
    if cancelled is not None:
        log.info("job.cancelled", job_id=job_id, variant=job.variant)
        await _notify_done(redis, settings, job_id)
        return job
    if job.status in TERMINAL_STATUSES:
        raise Conflict(f"job {job_id!r} is already {job.status}", {"status": job.status})
    await redis.set(cancel_key(settings, job_id), time.time(), ex=settings.visibility_timeout_s)
    response.status_code = status.HTTP_202_ACCEPTED
    return job


async def _record_ended(redis: RedisDep, settings: Settings, charge: jobs_repo.Charge) -> None:
    """A job this API process ended: its terminal event and its /metrics counts (as
    workers.outcome does for the jobs workers and the reconciler end)."""
    if charge.ended is None:
        return
    try:
        async with redis.pipeline(transaction=False) as pipe:
            record_ended(pipe, settings, [charge.ended])
            await pipe.execute()
    except RedisError:
        log.warning("metrics.record_failed", job_id=charge.job_id)


async def _notify_done(redis: RedisDep, settings: Settings, job_id: str) -> None:
    try:
        await redis.publish(job_done_channel(settings, job_id), "cancelled")
    except RedisError:
        log.warning("job.notify_failed", job_id=job_id)
