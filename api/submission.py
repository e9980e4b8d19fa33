"""Submitting a job: what `POST /v1/jobs` does, and what the OpenAI-compatible routes do for
each chat completion and batch line (one path, so every job is checked, admitted, metered and
queued alike)."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

import structlog
from celery import Celery
from fastapi import Depends, Request
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker
from starlette.concurrency import run_in_threadpool

from api import quota as admission
from api.deps import (
    AutocommitDep,
    BrokerDep,
    FleetDep,
    QuotasDep,
    RedisDep,
    SessionMakerDep,
    SettingsDep,
    UserDep,
    VariantsDep,
)
from api.fleet import availability
from api.fleet_view import FleetView
from api.media import NO_MEDIA, MediaTotals, check_parts, inspect_inline, store_media
from core import faults, moderation, structured
from core.broker import send_job
from core.errors import (
    Conflict,
    ContentFiltered,
    NotFound,
    PayloadTooLarge,
    Unavailable,
    UnknownVariant,
    ValidationFailed,
)
from core.metrics import add_filtered, record_ended_args
from core.queues import cancel_channel, cancel_key, job_done_channel
from core.quotas import AsyncQuotas
from core.schemas import JobCreate, JobOut
from core.settings import Settings
from core.variants import Variant, VariantRegistry
from core.webhooks import check_target
from db.ids import new_id
from db.models import User
from db.repo import jobs as jobs_repo

log = structlog.get_logger(__name__)

# A token is at least ~1 character; input far past the variant's token cap is refused here,
# the exact token count is checked by the worker's tokenizer.
CHARS_PER_TOKEN_CEILING = 8


@dataclass(frozen=True)
class Submitted:
    job: JobOut
    replayed: bool  # an earlier job with the same Idempotency-Key and body


@dataclass
class Submitter:
    """How jobs get submitted for one user: a request's (`SubmitterDep`), or a batch's lines'
    (api/batches.py, no request: lines take no part of the per-minute window)."""

    user: User
    quota: AsyncQuotas
    maker: async_sessionmaker[AsyncSession]
    autocommit: AsyncEngine
    broker: Celery
    redis: Redis
    fleet: FleetView
    settings: Settings
    variants: VariantRegistry
    request: Request | None = None

    async def submit(
        self, spec: JobCreate, idempotency_key: str | None = None, batch: tuple[str, int] | None = None
    ) -> Submitted:
        """Queue a job. A repeat with the same `Idempotency-Key` and body returns the first job;
        the same key with a different body is a 409. Inline media is checked and stored as files.
        Admission takes one request from the per-minute window, one concurrent-job slot and the
        job's tokens (input estimate + `max_new_tokens`, settled to the real count when it ends)."""
        user, settings, autocommit, quota = self.user, self.settings, self.autocommit, self.quota
        limits = admission.limits_of(user, settings)
        admission.check_variant(limits, spec.variant)
        variant = await _check_spec(spec, self.variants, self.fleet, settings)
        await self.check_content(spec)
        request_hash = hashlib.sha256(spec.model_dump_json().encode()).hexdigest()
        if idempotency_key is not None:
            async with autocommit.connect() as connection:
                earlier = await jobs_repo.find_idempotent(
                    session=connection, user_id=user.id, idempotency_key=idempotency_key
                )
            if earlier is not None:
                return await _replay(earlier, request_hash, autocommit, user.id)
        inline = await inspect_inline(spec, settings)
        job_id = new_id("job")
        reservation: admission.Reservation | None = None

        async def admit(media: MediaTotals) -> admission.Reservation:
            nonlocal reservation
            reservation = await admission.admit(
                request=self.request, maker=self.maker, quota=quota, limits=limits, user=user, job_id=job_id,
                spec=spec, media=media, batch=batch is not None,
            )  # fmt: skip
            return reservation

        async def insert(db: AsyncSession | AsyncConnection, granted: admission.Reservation) -> RowMapping:
            job, created = await jobs_repo.create_job(
                session=db, user_id=user.id, spec=spec, idempotency_key=idempotency_key,
                request_hash=request_hash, job_id=job_id, charged_on=granted.day,
                reserved_tokens=granted.tokens, batch=batch,
            )  # fmt: skip
            if not created:
                raise _Replay(job)
            return job

        try:
            if spec.input.media():  # its files and its row: one transaction
                async with self.maker() as session, session.begin():
                    media = await store_media(
                        session=session, user_id=user.id, spec=spec, inline=inline,
                        max_audio_seconds=variant.max_audio_seconds, retention_s=settings.files_retention_s,
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
                return await _replay(exc.job, request_hash, autocommit, user.id)
            raise
        assert reservation is not None
        structlog.contextvars.bind_contextvars(job_id=job_id, variant=spec.variant)
        faults.crash_here(settings, faults.API_AFTER_COMMIT)
        try:
            await _enqueue_or_withdraw(
                self.maker,
                self.redis,
                self.broker,
                job_id,
                spec.variant,
                spec.priority,
                reservation.in_flight,
            )
        except Unavailable:
            await admission.release(quota, user.id, reservation)
            raise
        log.info("job.queued", task=spec.task, priority=spec.priority, media=len(spec.input.media()))
        return Submitted(jobs_repo.job_out(job), replayed=False)

    def policy(self) -> moderation.Policy:
        """The user's moderation policy: their quota's override, else the deployment's."""
        override = self.user.quota.moderation_policy if self.user.quota is not None else None
        return moderation.policy_for(override, self.settings.moderation_policy)

    async def check_content(self, spec: JobCreate) -> None:
        """Refuse an input that falls in a category of the user's policy (400 CONTENT_FILTERED),
        before anything is queued; the refusal names the category, never the text."""
        category = self.policy().check(spec.input.text(), "input")
        if category is None:
            return
        log.warning("job.filtered", stage="input", category=category, user_id=self.user.id)
        with contextlib.suppress(RedisError):
            async with self.redis.pipeline(transaction=False) as pipe:
                add_filtered(pipe, self.settings, self.user.id, "input", category)
                await pipe.execute()
        raise ContentFiltered(
            f"the input falls in the content policy's category {category!r}", {"category": category}
        )

    async def submit_all(self, specs: Sequence[JobCreate]) -> list[JobOut]:
        """Queue the jobs of one request (a completion's prompts): all of them, or none — when
        one is refused, those queued before it are cancelled, and the refusal is raised."""
        limits = admission.limits_of(self.user, self.settings)
        for spec in specs:  # what can be refused before anything is queued
            admission.check_variant(limits, spec.variant)
            await _check_spec(spec, self.variants, self.fleet, self.settings)
            await self.check_content(spec)
        jobs: list[JobOut] = []
        try:
            for spec in specs:
                jobs.append((await self.submit(spec)).job)
        except BaseException:
            for job in jobs:
                if not await self.cancel_queued(job.id):
                    await self.stop_running(job.id)
            raise
        return jobs

    async def cancel_queued(self, job_id: str) -> bool:
        """End the user's job `cancelled` if it is still queued (it never runs): its slot and
        tokens released, its end recorded (event, metrics) and its waiters woken."""
        async with self.maker() as session, session.begin():
            charge = await jobs_repo.cancel_queued(session=session, user_id=self.user.id, job_id=job_id)
        if charge is None:
            return False
        await admission.release(self.quota, self.user.id, charge)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                if charge.ended is not None:  # as workers.outcome does for the jobs workers end
                    keys, args = record_ended_args(self.settings, [charge.ended])
                    await self.quota.record_ended(keys=keys, args=args, client=pipe)
                pipe.publish(job_done_channel(self.settings, job_id), "cancelled")
                await pipe.execute()
        except RedisError:  # waiters re-read their job every few seconds
            log.warning("job.notify_failed", job_id=job_id)
        log.info("job.cancelled", job_id=job_id)
        return True

    async def stop_running(self, job_id: str) -> None:
        """Ask the worker running the job to stop it at its next decoding step."""
        flag = cancel_key(self.settings, job_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(flag, time.time(), ex=self.settings.visibility_timeout_s)
            pipe.publish(cancel_channel(self.settings), job_id)
            await pipe.execute()


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
        if not variant.translate or target not in ("en", "english"):
            raise ValidationFailed(
                f"{variant.name} cannot translate into {spec.params.target_language or 'English'}: "
                + ("Whisper translates into English only" if variant.translate else "it does not translate"),
                {"variant": variant.name, "target_language": spec.params.target_language},
            )
    if spec.params.constrained():
        await _check_grammar(spec, variant)
    if spec.webhook_url is not None:
        await run_in_threadpool(check_target, spec.webhook_url, settings)  # resolves the host
    problem = availability(variant, variants, await fleet.workers())
    if problem is not None:  # refused only on a fresh read of the heartbeats
        problem = availability(variant, variants, await fleet.workers(fresh=True))
    if problem is not None:
        raise Unavailable(f"variant {variant.name!r} cannot run here: {problem}", {"variant": variant.name})
    return variant


async def _check_grammar(spec: JobCreate, variant: Variant) -> None:
    """A constrained reply: the variant decodes step by step, and its grammar compiles within the
    limits (in a thread: a schema's compile never holds up the event loop)."""
    params = spec.params
    field = "params.tool_choice" if params.tool_choice not in (None, "none") else "params.response_format"
    if variant.batching != "continuous":
        raise ValidationFailed(
            f"{field}: {variant.name} does not constrain its replies (its batching is {variant.batching}); "
            "text variants with continuous batching do",
            {"variant": variant.name},
        )
    if params.tool_choice not in (None, "none", "auto") and not spec.input.tools:
        raise ValidationFailed("params.tool_choice: a tool is required, but input.tools is empty")
    try:
        grammar = structured.grammar_of(params.response_format, params.tool_choice, spec.input.tools)
        if grammar is not None:
            await run_in_threadpool(structured.check_cached, grammar)
    except structured.StructuredError as exc:
        raise ValidationFailed(f"{field}: {exc}", {"field": field}) from None


class _Replay(Exception):
    """The Idempotency-Key was taken meanwhile: roll back what this request wrote, answer the first job."""

    def __init__(self, job: RowMapping) -> None:
        self.job = job


async def read_job(autocommit: AsyncEngine, user_id: str, job_id: str) -> JobOut:
    async with autocommit.connect() as connection:
        job = await jobs_repo.get_job(session=connection, user_id=user_id, job_id=job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    return jobs_repo.job_out(job)


async def _replay(job: RowMapping, request_hash: str, autocommit: AsyncEngine, user_id: str) -> Submitted:
    if job["request_hash"] != request_hash:
        raise Conflict(
            "this Idempotency-Key was used for a different request",
            {"idempotency_key": job["idempotency_key"], "job_id": job["id"]},
        )
    return Submitted(await read_job(autocommit, user_id, job["id"]), replayed=True)


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


async def _submitter(
    request: Request,
    user: UserDep,
    quota: QuotasDep,
    maker: SessionMakerDep,
    autocommit: AutocommitDep,
    broker: BrokerDep,
    redis: RedisDep,
    fleet: FleetDep,
    settings: SettingsDep,
    variants: VariantsDep,
) -> Submitter:
    return Submitter(user, quota, maker, autocommit, broker, redis, fleet, settings, variants, request)


SubmitterDep = Annotated[Submitter, Depends(_submitter)]
