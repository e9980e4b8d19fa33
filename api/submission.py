"""Submitting a job: what `POST /v1/jobs` does, and what the OpenAI-compatible routes and the batch
runner do for each chat completion, response, transcription and batch line (one path, so every
job is checked, admitted, metered and queued alike).

A submission goes through five steps:
- `validate`: what can be refused cheaply before anything is written — the variant (the caller's
  quota allows it, it serves the task, some worker can run it), the params and media parts against
  its limits (api/job_checks.py), its adapter (the caller's, or a public one, of that variant:
  the job records its id), the caller's content policy;
- the costly checks, `checks_per_user` of a user's submissions at a time (`PerUser`): first what
  the quota would refuse now is refused (`admission.foresee`, nothing taken), then a grammar is
  compiled, a webhook's host resolved (api/job_checks.py) and inline media decoded — so a refused
  request spends none of that work;
- `admit`: quota admission (api/admission.py) — one request from the per-minute window, one
  concurrent-job slot and the job's tokens, reserved;
- `insert`: the job's row, in one statement; a job with media stores its inline media as files,
  is admitted and has its row written in one transaction;
- `enqueue`: the broker message, after commit; if the broker is down, the job is withdrawn.
A repeated Idempotency-Key answers the first job instead (`Submitted.replayed`); a reservation
whose job was not queued is given back.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from celery import Celery
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import RowMapping
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from api import admission
from api.admission import WindowSeen
from api.cancels import Cancels
from api.fleet import FleetView
from api.job_checks import PerUser, check_costly, check_spec
from api.media_admission import (
    NO_MEDIA,
    InlineMedia,
    MediaTotals,
    inspect_inline,
    store_media,
)
from api.schemas import job_out
from core import faults, moderation
from core.broker import send_job
from core.errors import (
    Conflict,
    ContentFiltered,
    NotFound,
    Unavailable,
    ValidationFailed,
)
from core.metrics import add_filtered
from core.quotas import AsyncQuotas, Limits
from core.schemas import JobCreate, JobOut
from core.settings import Settings
from core.variants import Variant, VariantRegistry
from db.ids import new_id
from db.models import User
from db.repo import adapters as adapters_repo
from db.repo import jobs as jobs_repo

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Submitted:
    job: JobOut
    replayed: bool  # an earlier job with the same Idempotency-Key and body


@dataclass(frozen=True)
class Draft:
    """A validated job on its way in: what the steps after `validate` need to know of it."""

    user: User
    limits: Limits
    variant: Variant
    spec: JobCreate
    job_id: str
    request_hash: str
    idempotency_key: str | None
    batch: tuple[str, int] | None  # a batch's line: (batch id, line number)


@dataclass(frozen=True)
class Written:
    """The row `insert` wrote, or found: an earlier job that took the Idempotency-Key meanwhile
    (`created` False: what this submission wrote is rolled back and its reservation given back)."""

    row: RowMapping
    created: bool
    reservation: admission.Reservation


class Submitter:
    """Submits jobs. One per API process, built in the app's lifespan
    (`app.state.submitter`) and shared by the routes (api/deps.py `SubmitterDep`) and the batch
    runner; whose jobs they are is a parameter of each method."""

    def __init__(
        self,
        *,
        quota: AsyncQuotas,
        maker: async_sessionmaker[AsyncSession],
        autocommit: AsyncEngine,
        broker: Celery,
        redis: Redis,
        fleet: FleetView,
        settings: Settings,
        variants: VariantRegistry,
        cancels: Cancels,
        releases: admission.Releases,
    ) -> None:
        self.cancels = cancels  # for the jobs of a request refused part way
        self.quota = quota
        self.releases = releases  # what admission reserved for jobs never queued goes back
        self.maker = maker
        self.autocommit = autocommit
        self.broker = broker
        self.redis = redis
        self.fleet = fleet
        self.settings = settings
        self.variants = variants
        self.costly = PerUser(settings.checks_per_user)

    async def submit(
        self,
        user: User,
        spec: JobCreate,
        *,
        idempotency_key: str | None = None,
        batch: tuple[str, int] | None = None,
        window_seen: WindowSeen | None = None,
    ) -> Submitted:
        """Queue a job. A repeat with the same `Idempotency-Key` and body returns the first job;
        the same key with a different body is a 409. Inline media is checked and stored as files.
        A batch's line (`batch`) takes no part of the per-minute window; `window_seen` is told the
        caller's window after admission, refused or not."""
        limits = admission.limits_of(user, self.settings)
        variant = await self.validate(user, limits, spec)
        draft = Draft(
            user=user, limits=limits, variant=variant, spec=spec, job_id=new_id("job"),
            request_hash=hashlib.sha256(spec.model_dump_json().encode()).hexdigest(),
            idempotency_key=idempotency_key, batch=batch,
        )  # fmt: skip
        earlier = await self._earlier(draft)
        if earlier is not None:
            return await self._replay(draft, earlier)
        async with self.costly.turn(user.id):  # what the quota refuses now spends none of it
            await admission.foresee(
                window_seen=window_seen, quota=self.quota, limits=limits, user=user, spec=spec,
                batch=batch is not None,
            )  # fmt: skip
            await check_costly(spec, self.settings)
            inline = await inspect_inline(spec, self.settings)
        written = await self._admit_and_insert(draft, inline, window_seen)
        if not written.created:
            return await self._replay(draft, written.row)
        await self.enqueue(draft, written.reservation)
        return Submitted(job_out(written.row), replayed=False)

    async def validate(self, user: User, limits: Limits, spec: JobCreate) -> Variant:
        """Refuse what can be refused before anything is written; the variant that will run the job."""
        admission.check_variant(limits, spec.variant)
        variant = await check_spec(spec, self.variants, self.fleet, self.settings)
        if spec.params.adapter is not None:
            spec.params.adapter = await self.adapter_of(user, variant, spec.params.adapter)
        await self.check_content(user, spec)
        return variant

    async def adapter_of(self, user: User, variant: Variant, named: str) -> str:
        """The id of the adapter `named` (a name or an id) of `variant` that `user` may run;
        404 for one they may not see, as for a file of another tenant."""
        if variant.lora is None:
            raise ValidationFailed(
                f"params.adapter: {variant.name} takes no adapters",
                {"variant": variant.name, "variants": [v.name for v in self.variants if v.lora is not None]},
            )
        async with self.maker() as session:
            adapter = await adapters_repo.resolve(
                session=session, user_id=user.id, base=variant.name, name=named
            )
        if adapter is None:
            raise NotFound(
                f"no adapter {named!r} of {variant.name}", {"adapter": named, "variant": variant.name}
            )
        return adapter.id

    async def admit(
        self, draft: Draft, media: MediaTotals, window_seen: WindowSeen | None
    ) -> admission.Reservation:
        """The job's reservation: a place in the per-minute window, a concurrent-job slot and its
        tokens (input estimate + `max_new_tokens`, settled to the real count when it ends)."""
        return await admission.admit(
            window_seen=window_seen, maker=self.maker, quota=self.quota, limits=draft.limits,
            user=draft.user, job_id=draft.job_id, spec=draft.spec, media=media, batch=draft.batch is not None,
        )  # fmt: skip

    async def insert(
        self, db: AsyncSession | AsyncConnection, draft: Draft, reservation: admission.Reservation
    ) -> tuple[RowMapping, bool]:
        """The job's queued row and True; or, when its Idempotency-Key was taken meanwhile, the
        row of the job that took it and False."""
        return await jobs_repo.create_job(
            session=db, user_id=draft.user.id, spec=draft.spec, idempotency_key=draft.idempotency_key,
            request_hash=draft.request_hash, job_id=draft.job_id, charged_on=reservation.day,
            reserved_tokens=reservation.tokens, batch=draft.batch, shared_priority=reservation.shared,
        )  # fmt: skip

    async def enqueue(self, draft: Draft, reservation: admission.Reservation) -> None:
        """Send the committed job's message. If the broker is down the job is withdrawn, its
        reservation given back and the caller told 503 — unless a worker has taken it meanwhile
        (the message went out after all): then it stands."""
        spec = draft.spec
        structlog.contextvars.bind_contextvars(job_id=draft.job_id, variant=spec.variant)
        faults.crash_here(self.settings, faults.API_AFTER_COMMIT)
        try:
            await send_job(
                self.redis, self.broker, job_id=draft.job_id, variant=spec.variant, priority=spec.priority,
                in_flight=reservation.in_flight, shared=reservation.shared,
            )  # fmt: skip
        except Exception as exc:
            log.error("job.enqueue_failed", error=type(exc).__name__)
            async with self.maker() as session, session.begin():
                withdrawn = await jobs_repo.withdraw(session=session, job_id=draft.job_id)
            if withdrawn:
                await self.releases.give_back(draft.user.id, reservation)
                raise Unavailable("the job queue is not answering; retry shortly") from exc
        log.info("job.queued", task=spec.task, priority=spec.priority, media=len(spec.input.media()))

    async def _admit_and_insert(
        self, draft: Draft, inline: list[InlineMedia], window_seen: WindowSeen | None
    ) -> Written:
        """`admit`, then `insert`: a job with media has its inline media checked and stored as
        files, is admitted and has its row written, all in one transaction; a job without, is
        admitted, then written in one statement. Whatever fails after admission gives the
        reservation back, as does finding the Idempotency-Key taken."""
        reservation: admission.Reservation | None = None
        try:
            if draft.spec.input.media():  # its files and its row: one transaction
                async with self.maker() as session, session.begin() as transaction:
                    media = await store_media(
                        session=session, user_id=draft.user.id, spec=draft.spec, inline=inline,
                        max_audio_seconds=draft.variant.max_audio_seconds,
                        retention_s=self.settings.files_retention_s,
                        limits=admission.limits_of(draft.user, self.settings),
                    )  # fmt: skip
                    reservation = await self.admit(draft, media, window_seen)
                    row, created = await self.insert(session, draft, reservation)
                    if not created:  # the files stored for this submission go too
                        await transaction.rollback()
            else:  # its row alone: one statement
                reservation = await self.admit(draft, NO_MEDIA, window_seen)
                async with self.autocommit.connect() as connection:
                    row, created = await self.insert(connection, draft, reservation)
        except BaseException:
            if reservation is not None:  # nothing was queued: the slot and the tokens go back
                await self.releases.give_back(draft.user.id, reservation)
            raise
        assert reservation is not None  # both ways admit before they insert
        if not created:
            await self.releases.give_back(draft.user.id, reservation)
        return Written(row=row, created=created, reservation=reservation)

    async def _earlier(self, draft: Draft) -> RowMapping | None:
        """The user's job that already holds the draft's Idempotency-Key, if any."""
        if draft.idempotency_key is None:
            return None
        async with self.autocommit.connect() as connection:
            return await jobs_repo.find_idempotent(
                session=connection, user_id=draft.user.id, idempotency_key=draft.idempotency_key
            )

    async def _replay(self, draft: Draft, earlier: RowMapping) -> Submitted:
        """The earlier job with the same Idempotency-Key, if it came with the same body."""
        if earlier["request_hash"] != draft.request_hash:
            raise Conflict(
                "this Idempotency-Key was used for a different request",
                {"idempotency_key": earlier["idempotency_key"], "job_id": earlier["id"]},
            )
        return Submitted(await read_job(self.autocommit, draft.user.id, earlier["id"]), replayed=True)

    async def check_content(self, user: User, spec: JobCreate) -> None:
        """Refuse an input that falls in a category of the user's policy (400 CONTENT_FILTERED),
        before anything is queued; the refusal names the category, never the text."""
        category = moderation.policy_for(moderation.user_override(user), self.settings).check(
            spec.input.text(), "input"
        )
        if category is None:
            return
        log.warning("job.filtered", stage="input", category=category, user_id=user.id)
        with contextlib.suppress(RedisError):
            async with self.redis.pipeline(transaction=False) as pipe:
                add_filtered(pipe, self.settings, user.id, "input", category)
                await pipe.execute()
        raise ContentFiltered(
            f"the input falls in the content policy's category {category!r}", {"category": category}
        )

    async def submit_all(
        self, user: User, specs: Sequence[JobCreate], *, window_seen: WindowSeen | None = None
    ) -> list[JobOut]:
        """Queue the jobs of one request (a completion's prompts): all of them, or none — when
        one is refused, those queued before it are cancelled, and the refusal is raised."""
        limits = admission.limits_of(user, self.settings)
        for spec in specs:  # what can be refused before anything is queued
            await self.validate(user, limits, spec)
        jobs: list[JobOut] = []
        try:
            for spec in specs:
                jobs.append((await self.submit(user, spec, window_seen=window_seen)).job)
        except BaseException:
            for job in jobs:
                await self.cancels.either(user.id, job.id)
            raise
        return jobs


async def read_job(autocommit: AsyncEngine, user_id: str, job_id: str) -> JobOut:
    async with autocommit.connect() as connection:
        job = await jobs_repo.get_job(session=connection, user_id=user_id, job_id=job_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    return job_out(job)
