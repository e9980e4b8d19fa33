"""Job rows on the API's side (async): created, read, listed, cancelled while queued.

What workers and the reconciler do to a job is in `db.repo.runs`.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession

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
            "expires_at": job.expires_at,
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
        "expires_at": spec.expires_at,
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


async def withdraw(*, session: AsyncSession, job_id: str) -> bool:
    """Delete a job whose message could not be sent — only while it is still queued."""
    stmt = delete(Job).where(Job.id == job_id, Job.status == "queued").returning(Job.id)
    return (await session.execute(stmt)).scalar_one_or_none() is not None


async def ledger(*, session: AsyncSession, user_id: str, since: date) -> list[UsageLedger]:
    stmt = (
        select(UsageLedger)
        .where(UsageLedger.user_id == user_id, UsageLedger.day >= since)
        .order_by(UsageLedger.day.desc())
    )
    return list((await session.execute(stmt)).scalars())
