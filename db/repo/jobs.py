"""Job rows: created and read by the API (async), claimed and finished by workers (sync).

Every state change is a conditional UPDATE, so a redelivered message or a second
worker can never move a job twice: a terminal status never changes again.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from core.schemas import TERMINAL_STATUSES, JobCreate, JobOut
from db.ids import new_id
from db.models import Job, JobMetric, UsageLedger

MAX_PAGE = 100
TERMINAL = sorted(TERMINAL_STATUSES)


@dataclass(frozen=True)
class Charge:
    """What a job that reached a terminal state costs its owner: settled against the quota once."""

    job_id: str
    user_id: str
    day: date
    tokens: int


def tokens_used(result: dict[str, Any] | None) -> tuple[int, int]:
    usage = (result or {}).get("usage") or {}
    return int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)


def charge_of(job: Job) -> Charge:
    return Charge(job_id=job.id, user_id=job.user_id, day=job.charged_on, tokens=sum(tokens_used(job.result)))


def job_out(job: Job, metric: JobMetric | None) -> JobOut:
    metrics = None
    if metric is not None:
        metrics = {
            c: getattr(metric, c)
            for c in (
                "attempt", "queue_ms", "load_ms", "time_to_first_token_ms", "inference_ms", "total_ms",
                "input_tokens", "output_tokens", "tokens_per_second", "batch_size", "images", "audio_clips",
                "audio_seconds", "preprocess_ms", "peak_memory_bytes",
                "worker", "device",
            )
        }  # fmt: skip
    return JobOut.model_validate(
        {
            "id": job.id,
            "status": job.status,
            "variant": job.variant,
            "task": job.task,
            "priority": job.priority,
            "created_at": job.created_at,
            "started_at": job.started_at,
            "finished_at": job.finished_at,
            "result": job.result,
            "error": job.error,
            "metrics": metrics,
            "metadata": job.metadata_,
            "attempts": job.attempts,
        }
    )


# ---- API side ------------------------------------------------------------------------------


async def find_idempotent(*, session: AsyncSession, user_id: str, idempotency_key: str) -> Job | None:
    stmt = select(Job).where(Job.user_id == user_id, Job.idempotency_key == idempotency_key)
    return (await session.execute(stmt)).scalar_one_or_none()


async def create_job(
    *,
    session: AsyncSession,
    user_id: str,
    spec: JobCreate,
    idempotency_key: str | None,
    request_hash: str,
    job_id: str | None = None,
    charged_on: date | None = None,
    reserved_tokens: int = 0,
) -> tuple[Job, bool]:
    """Insert a queued job; with an idempotency key already used, return that job instead."""
    values: dict[str, Any] = {
        "id": job_id or new_id("job"),
        "user_id": user_id,
        "variant": spec.variant,
        "task": spec.task,
        "status": "queued",
        "priority": spec.priority,
        "input": spec.input.model_dump(mode="json", exclude_none=True),
        "params": spec.params.model_dump(mode="json"),
        "metadata": spec.metadata,
        "webhook_url": spec.webhook_url,
        "idempotency_key": idempotency_key,
        "request_hash": request_hash,
        "attempts": 0,
        "reserved_tokens": reserved_tokens,
    }
    if charged_on is not None:
        values["charged_on"] = charged_on
    stmt = pg_insert(Job).values(values).on_conflict_do_nothing().returning(Job.id)
    inserted = (await session.execute(stmt)).scalar_one_or_none()
    if inserted is not None:
        return await _get(session, Job.id == inserted), True
    existing = await _get(session, and_(Job.user_id == user_id, Job.idempotency_key == idempotency_key))
    return existing, False


async def _get(session: AsyncSession, where: Any) -> Job:
    return (await session.execute(select(Job).where(where))).scalar_one()


async def get_job(*, session: AsyncSession, user_id: str, job_id: str) -> Job | None:
    stmt = (
        select(Job).where(Job.id == job_id, Job.user_id == user_id).execution_options(populate_existing=True)
    )
    return (await session.execute(stmt)).scalar_one_or_none()


async def latest_metrics(*, session: AsyncSession, job_ids: list[str]) -> dict[str, JobMetric]:
    if not job_ids:
        return {}
    rows = await session.execute(
        select(JobMetric)
        .where(JobMetric.job_id.in_(job_ids))
        .order_by(JobMetric.job_id, JobMetric.attempt.desc())
        .distinct(JobMetric.job_id)
    )
    return {m.job_id: m for m in rows.scalars()}


@dataclass(frozen=True)
class Page:
    jobs: list[Job]
    next_cursor: str | None


def _encode_cursor(job: Job) -> str:
    raw = json.dumps([job.created_at.isoformat(), job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Raises ValueError for a cursor this API did not hand out."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, job_id = json.loads(raw)
        return datetime.fromisoformat(created), str(job_id)
    except Exception as exc:
        raise ValueError("malformed cursor") from exc


async def list_jobs(
    *,
    session: AsyncSession,
    user_id: str,
    status: str | None,
    variant: str | None,
    cursor: tuple[datetime, str] | None,
    limit: int,
) -> Page:
    stmt = select(Job).where(Job.user_id == user_id)
    if status:
        stmt = stmt.where(Job.status == status)
    if variant:
        stmt = stmt.where(Job.variant == variant)
    if cursor:
        created, job_id = cursor
        stmt = stmt.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id)))
    stmt = stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    jobs = list((await session.execute(stmt)).scalars())
    more = len(jobs) > limit
    jobs = jobs[:limit]
    return Page(jobs=jobs, next_cursor=_encode_cursor(jobs[-1]) if more and jobs else None)


async def cancel_queued(*, session: AsyncSession, user_id: str, job_id: str) -> Charge | None:
    """A queued job becomes cancelled here; its message is dropped when a worker sees it."""
    job = (
        await session.execute(
            update(Job)
            .where(Job.id == job_id, Job.user_id == user_id, Job.status == "queued")
            .values(
                status="cancelled",
                finished_at=func.now(),
                error={"code": "CANCELLED", "message": "cancelled by the caller before it ran"},
            )
            .returning(Job)
        )
    ).scalar_one_or_none()
    return charge_of(job) if job is not None else None


async def terminal_charges(*, session: AsyncSession, user_id: str, job_ids: list[str]) -> dict[str, Charge]:
    """Of these jobs, the ones that ended, with what they cost (to release slots left held)."""
    rows = await session.execute(
        select(Job).where(Job.user_id == user_id, Job.id.in_(job_ids), Job.status.in_(TERMINAL))
    )
    return {job.id: charge_of(job) for job in rows.scalars()}


async def existing_ids(*, session: AsyncSession, job_ids: list[str]) -> set[str]:
    return set((await session.execute(select(Job.id).where(Job.id.in_(job_ids)))).scalars())


async def ledger(*, session: AsyncSession, user_id: str, since: date) -> list[UsageLedger]:
    stmt = (
        select(UsageLedger)
        .where(UsageLedger.user_id == user_id, UsageLedger.day >= since)
        .order_by(UsageLedger.day.desc())
    )
    return list((await session.execute(stmt)).scalars())


# ---- worker side ---------------------------------------------------------------------------


def claim(
    *, session: Session, job_id: str, worker: str, live_workers: set[str] | None, max_attempts: int
) -> Job | None:
    """Take the job for this worker (attempt + 1), or None when it is terminal or held by a live worker.

    A queued job is taken. A running job is taken again only when the worker that held it
    is gone (its message came back after the worker died) — with `live_workers` None
    (unknown) a running job is never taken.
    """
    taken = Job.status == "queued"
    if live_workers is not None:
        orphaned = and_(Job.status == "running", Job.worker.not_in(live_workers), Job.attempts < max_attempts)
        taken = or_(taken, orphaned)
    stmt = (
        update(Job)
        .where(Job.id == job_id, taken)
        .values(status="running", started_at=func.now(), attempts=Job.attempts + 1, worker=worker)
        .returning(Job)
    )
    return session.execute(stmt).scalar_one_or_none()


def fail_orphaned(
    *, session: Session, job_id: str, live_workers: set[str], max_attempts: int
) -> Charge | None:
    """A running job whose workers died `max_attempts` times ends failed."""
    job = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.status == "running",
            Job.worker.not_in(live_workers),
            Job.attempts >= max_attempts,
        )
        .values(
            status="failed",
            finished_at=func.now(),
            error={"code": "GENERATION_ERROR", "message": f"its worker was lost {max_attempts} times"},
        )
        .returning(Job)
    ).scalar_one_or_none()
    return charge_of(job) if job is not None else None


def terminal_charge(*, session: Session, job_id: str) -> Charge | None:
    """The job's cost if it has ended (a redelivered message of a finished job settles again, harmlessly)."""
    job = session.execute(select(Job).where(Job.id == job_id, Job.status.in_(TERMINAL))).scalar_one_or_none()
    return charge_of(job) if job is not None else None


def finish(
    *,
    session: Session,
    job_id: str,
    attempt: int,
    status: str,
    result: dict[str, Any] | None,
    error: dict[str, Any] | None,
    metrics: dict[str, Any] | None,
) -> Charge | None:
    """running → terminal, once, with its usage added to the ledger in the same transaction.
    None when the job was already finished (a redelivery)."""
    job = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "running", Job.attempts == attempt)
        .values(status=status, result=result, error=error, finished_at=func.now())
        .returning(Job)
    ).scalar_one_or_none()
    if job is None:
        return None
    charge = charge_of(job)
    if charge.tokens:
        _add_usage(session, charge, *tokens_used(result))
    if metrics is not None:
        session.execute(
            pg_insert(JobMetric)
            .values(job_id=job_id, attempt=attempt, **metrics)
            .on_conflict_do_nothing(constraint="uq_job_metrics_job_attempt")
        )
    return charge


def _add_usage(session: Session, charge: Charge, input_tokens: int, output_tokens: int) -> None:
    insert = pg_insert(UsageLedger).values(
        user_id=charge.user_id, day=charge.day, input_tokens=input_tokens, output_tokens=output_tokens, jobs=1
    )
    session.execute(
        insert.on_conflict_do_update(
            index_elements=[UsageLedger.user_id, UsageLedger.day],
            set_={
                "input_tokens": UsageLedger.input_tokens + insert.excluded.input_tokens,
                "output_tokens": UsageLedger.output_tokens + insert.excluded.output_tokens,
                "jobs": UsageLedger.jobs + 1,
                "updated_at": func.now(),
            },
        )
    )
