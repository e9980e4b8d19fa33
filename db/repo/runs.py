"""A job's run, on the workers' side (sync): claimed, finished, expired, or put back in the queue.

Every change is a conditional UPDATE, so a redelivered message, a second worker or the
reconciler can never move a job twice: a terminal status never changes again, and a
job's usage reaches the ledger in the one transaction that ends it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from core.errors import EXPIRED, GENERATION_ERROR
from db.models import Job, JobMetric, UsageLedger
from db.repo.jobs import TERMINAL as TERMINAL
from db.repo.jobs import Charge, charge_of, tokens_used

_NOT_EXPIRED = or_(Job.expires_at.is_(None), Job.expires_at > func.now())


def claim(*, session: Session, job_id: str, worker: str) -> Job | None:
    """Take a queued job for this worker (attempt + 1); None when it is not queued (running
    elsewhere, terminal) or its deadline has passed."""
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.status == "queued", _NOT_EXPIRED)
        .values(status="running", started_at=func.now(), attempts=Job.attempts + 1, worker=worker)
        .returning(Job)
    )
    return session.execute(stmt).scalar_one_or_none()


def expire(*, session: Session, job_ids: list[str] | None = None) -> list[Charge]:
    """Queued jobs past their deadline end `expired` without running (these ids, or all due)."""
    due = [Job.status == "queued", Job.expires_at <= func.now()]
    if job_ids is not None:
        due.append(Job.id.in_(job_ids))
    rows = session.execute(
        update(Job)
        .where(*due)
        .values(
            status="expired",
            finished_at=func.now(),
            error={"code": EXPIRED, "message": "its deadline (expires_at) passed while it was queued"},
        )
        .returning(Job)
    )
    return [charge_of(job) for job in rows.scalars()]


def terminal_charge(*, session: Session, job_id: str) -> Charge | None:
    """The job's cost if it has ended (a redelivered message of a finished job settles again, harmlessly)."""
    job = session.execute(select(Job).where(Job.id == job_id, Job.status.in_(TERMINAL))).scalar_one_or_none()
    return charge_of(job) if job is not None else None


def put_back(*, session: Session, job_id: str, attempt: int) -> Job | None:
    """A claimed job this worker never started (it is shutting down) goes back to `queued`;
    the attempt it did not use is given back."""
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.status == "running", Job.attempts == attempt)
        .values(status="queued", started_at=None, worker=None, attempts=Job.attempts - 1)
        .returning(Job)
    )
    return session.execute(stmt).scalar_one_or_none()


# ---- the reconciler ------------------------------------------------------------------------


@dataclass(frozen=True)
class Running:
    id: str
    attempts: int
    worker: str | None


@dataclass(frozen=True)
class Queued:
    id: str
    variant: str
    priority: int


def running(*, session: Session) -> list[Running]:
    rows = session.execute(select(Job.id, Job.attempts, Job.worker).where(Job.status == "running"))
    return [Running(*row) for row in rows]


def queued_before(*, session: Session, cutoff: datetime, limit: int = 5000) -> list[Queued]:
    rows = session.execute(
        select(Job.id, Job.variant, Job.priority)
        .where(Job.status == "queued", Job.created_at < cutoff)
        .order_by(Job.created_at)
        .limit(limit)
    )
    return [Queued(*row) for row in rows]


def requeue_lost(*, session: Session, job_id: str, attempt: int) -> Job | None:
    """A running job whose lease lapsed (its worker died) is queued again for its next attempt;
    the lost attempt keeps a `job_metrics` row of its own (which worker, how long it held the job)."""
    if not _record_lost_attempt(session, job_id, attempt):
        return None
    stmt = update(Job).where(Job.id == job_id).values(status="queued", worker=None).returning(Job)
    return session.execute(stmt).scalar_one()


def fail_lost(*, session: Session, job_id: str, attempt: int) -> Charge | None:
    """A running job whose workers were lost on every attempt ends failed."""
    if not _record_lost_attempt(session, job_id, attempt):
        return None
    job = session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(
            status="failed",
            finished_at=func.now(),
            error={"code": GENERATION_ERROR, "message": f"its worker was lost on all {attempt} attempts"},
        )
        .returning(Job)
    ).scalar_one()
    return charge_of(job)


def _record_lost_attempt(session: Session, job_id: str, attempt: int) -> bool:
    """Lock the job if it is still running this attempt, and write that attempt's metrics row."""
    row = session.execute(
        select(Job.worker, Job.started_at)
        .where(Job.id == job_id, Job.status == "running", Job.attempts == attempt)
        .with_for_update()
    ).first()
    if row is None:
        return False
    worker, started = row
    held_ms = (datetime.now(UTC) - started).total_seconds() * 1000 if started else None
    session.execute(
        pg_insert(JobMetric)
        .values(job_id=job_id, attempt=attempt, worker=worker, total_ms=held_ms)
        .on_conflict_do_nothing(constraint="uq_job_metrics_job_attempt")
    )
    return True


def states(*, session: Session, job_ids: list[str]) -> dict[str, Job]:
    return {j.id: j for j in session.execute(select(Job).where(Job.id.in_(job_ids))).scalars()}


# ---- finishing -----------------------------------------------------------------------------


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
