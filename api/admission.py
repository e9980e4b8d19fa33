"""Admission at the API: the caller's limits (their quota's row, else the deployment's defaults)
and the checks against them; the counters themselves are Redis scripts (core/quotas.py).

`admit` runs after the job's media is checked (inside the transaction that stores it) and before
its row is written; whatever refuses or fails after a reservation gives it back through `release`.
Slots a crash leaves held are released by the reconciler (workers/reconciler.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from typing import NoReturn

import structlog
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api.background import Background
from api.media_admission import NO_MEDIA, MediaTotals
from core import quotas, structured
from core.errors import Forbidden, PayloadTooLarge, QuotaExceeded, RateLimited, Unavailable
from core.quotas import AsyncQuotas, Limits, Snapshot
from core.scheduling import DEFAULT_MAX_PRIORITY, shared_priority
from core.schemas import JobCreate
from core.settings import Settings
from db.models import User
from db.repo import jobs as jobs_repo

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Reservation:
    job_id: str
    day: date
    tokens: int
    in_flight: int = 1  # the user's jobs admitted and not ended, this one included
    shared: int = DEFAULT_MAX_PRIORITY  # the job's priority among all users' (core/scheduling.py)


# Told the caller's rate-limit window after each admission, refused or not (for the RateLimit-*
# headers of the response: api/middleware.py `rate_headers`).
WindowSeen = Callable[[Snapshot], None]


def limits_of(user: User, settings: Settings) -> Limits:
    quota = user.quota
    if quota is None:
        return Limits.defaults(settings)
    return Limits(
        requests_per_minute=quota.requests_per_minute,
        tokens_per_day=quota.tokens_per_day,
        max_concurrent_jobs=quota.max_concurrent_jobs,
        max_input_bytes=quota.max_input_bytes,
        allowed_variants=quota.allowed_variants,
        max_storage_bytes=quota.max_storage_bytes,
        max_files=quota.max_files,
        max_priority=settings.quota_max_priority if quota.max_priority is None else quota.max_priority,
    )


def check_variant(limits: Limits, variant: str) -> None:
    if limits.allowed_variants is not None and variant not in limits.allowed_variants:
        raise Forbidden(
            f"your quota does not allow variant {variant!r}",
            {"limit": "allowed_variants", "variant": variant, "allowed": limits.allowed_variants},
        )


def input_bytes(spec: JobCreate, media: MediaTotals) -> int:
    schema = structured.schema_bytes(spec.params.response_format)
    return len(spec.input.text().encode()) + schema + media.bytes


async def foresee(
    *,
    window_seen: WindowSeen | None,
    quota: AsyncQuotas,
    limits: Limits,
    user: User,
    spec: JobCreate,
    batch: bool,
) -> None:
    """Refuse now what admission would refuse now (the per-minute window, the concurrent jobs,
    the day's tokens for the job's text and `max_new_tokens`), taking nothing: run before the
    checks that cost work (a grammar's compile, a webhook's DNS, inline media decoded), so that
    a request the quota refuses spends none of it. Admission itself still decides."""
    tokens = spec.params.max_new_tokens + quotas.estimate_input_tokens(
        text_bytes=input_bytes(spec, NO_MEDIA), images=0, audio_seconds=0
    )
    outcome = await quota.admit(
        user_id=user.id, limits=limits, job_id="", reserve=tokens, day=quotas.utc_day(), batch=batch,
        foresee=True,
    )  # fmt: skip
    if outcome.outcome not in (quotas.OK, quotas.SEED):
        if window_seen is not None:
            window_seen(outcome.snapshot)
        _refuse(outcome)


async def admit(
    *,
    window_seen: WindowSeen | None,
    maker: async_sessionmaker[AsyncSession],
    quota: AsyncQuotas,
    limits: Limits,
    user: User,
    job_id: str,
    spec: JobCreate,
    media: MediaTotals,
    batch: bool = False,
) -> Reservation:
    size = input_bytes(spec, media)
    if size > limits.max_input_bytes:
        raise PayloadTooLarge(
            f"the job's input is {size} bytes; your quota allows {limits.max_input_bytes}",
            {"limit": "max_input_bytes", "value": limits.max_input_bytes, "input_bytes": size},
        )
    tokens = spec.params.max_new_tokens + quotas.estimate_input_tokens(
        text_bytes=size - media.bytes, images=media.images, audio_seconds=media.audio_seconds
    )
    day = quotas.utc_day()
    for _ in range(2):
        outcome = await quota.admit(
            user_id=user.id, limits=limits, job_id=job_id, reserve=tokens, day=day, batch=batch
        )
        if window_seen is not None:
            window_seen(outcome.snapshot)
        if outcome.outcome == quotas.SEED:
            # One snapshot: every job is either settled in the ledger or in flight, never both.
            async with maker() as session, session.begin():
                await session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
                rows = await jobs_repo.ledger(session=session, user_id=user.id, since=day)
                flying = await jobs_repo.in_flight(session=session, user_id=user.id)
            settled = sum(r.input_tokens + r.output_tokens for r in rows if r.day == day)
            await quota.seed(user_id=user.id, day=day, settled=settled, in_flight=flying)
            continue
        break
    if outcome.outcome == quotas.OK:
        return Reservation(
            job_id=job_id,
            day=day,
            tokens=tokens,
            in_flight=outcome.snapshot.active_jobs,
            shared=shared_priority(spec.priority, limits.max_priority),
        )
    if outcome.outcome == quotas.SEED:  # the day's counter vanished twice in a row
        raise Unavailable("the quota counters are being rebuilt; retry shortly")
    _refuse(outcome)


def _refuse(outcome: quotas.Admission) -> NoReturn:
    snapshot = outcome.snapshot
    details = outcome.details
    if outcome.outcome == quotas.RATE:
        retry = max(1, snapshot.rate.reset_s)
        raise RateLimited(
            f"over {details['value']} job submissions per minute; retry in {retry} s",
            details | {"retry_after_s": retry},
            {"Retry-After": str(retry)},
        )
    if outcome.outcome == quotas.CONCURRENCY:
        retry = quotas.CONCURRENCY_RETRY_S
        raise QuotaExceeded(
            f"{details['active']} of your jobs are queued or running; your quota allows {details['value']}",
            details | {"retry_after_s": retry},
            {"Retry-After": str(retry)},
        )
    retry = quotas.seconds_to_midnight(snapshot.now_ms)
    raise QuotaExceeded(
        f"this job would take up to {details['requested']} tokens; {details['charged']} of your "
        f"{details['value']} tokens for today are used or reserved",
        details | {"retry_after_s": retry},
        {"Retry-After": str(retry)},
    )


class Releases(Background):
    """Gives back what admission reserved for a job that was never queued (withdrawn, replayed,
    or its row not written). A release Redis does not take (a failover, a restart: the job's
    message could not be sent for the same reason) is owed, and given back as soon as Redis
    answers again, rather than by the reconciler's sweep of admissions without a row
    (`STALE_ADMISSION_MS` later). Settling is idempotent, so a release given twice is harmless."""

    task_name = "owed-releases"
    RETRY_S = 0.2  # between tries while Redis does not answer, doubling…
    MAX_RETRY_S = 2.0  # …up to this
    LIMIT = 10_000  # releases owed at most (past it, the oldest is left to the reconciler)

    def __init__(self, quota: AsyncQuotas) -> None:
        self.quota = quota
        self._owed: dict[str, tuple[str, Reservation]] = {}  # job id → (user id, reservation)
        self._wake = asyncio.Event()

    @property
    def owed(self) -> int:
        return len(self._owed)

    async def give_back(self, user_id: str, reservation: Reservation) -> None:
        try:
            await self._settle(user_id, reservation)
        except RedisError:
            log.warning("quota.release_owed", job_id=reservation.job_id)
            if len(self._owed) >= self.LIMIT:
                self._owed.pop(next(iter(self._owed)))
            self._owed[reservation.job_id] = (user_id, reservation)
            self._wake.set()

    async def _settle(self, user_id: str, reservation: Reservation) -> None:
        await self.quota.settle(user_id=user_id, job_id=reservation.job_id, day=reservation.day, actual=0)

    async def _run(self) -> None:
        delay = self.RETRY_S
        while True:
            await self._wake.wait()
            for job_id, (user_id, reservation) in list(self._owed.items()):
                try:
                    await self._settle(user_id, reservation)
                except RedisError:
                    break
                self._owed.pop(job_id, None)
                log.info("quota.release_paid", job_id=job_id)
            if self._owed:
                await asyncio.sleep(delay)
                delay = min(2 * delay, self.MAX_RETRY_S)
            else:
                self._wake.clear()
                delay = self.RETRY_S
