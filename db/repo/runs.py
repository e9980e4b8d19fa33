"""A job's run, on the workers' side (sync): claimed, put back in the queue, requeued when its
worker was lost; and what the reconciler reads. How a job ends is db/endings.py.

Every change is a conditional UPDATE, so a redelivered message, a second worker or the
reconciler can never move a job twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Connection, Table, any_, bindparam, func, or_, select, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from db.models import Job, JobMetric, Quota

# The claim every job makes is built once (SQLAlchemy then reuses its compiled form) and is one
# round trip: on an autocommit connection, one statement is one transaction.
_jobs = cast(Table, Job.__table__)


@dataclass(frozen=True)
class Claimed:
    """A job as its worker took it: what running it needs."""

    id: str
    user_id: str
    variant: str
    priority: int
    attempts: int
    input: dict[str, Any]
    params: dict[str, Any]
    created_at: datetime
    started_at: datetime
    policy: dict[str, Any] | None = None  # the owner's moderation override (None: the deployment's)


_quotas = cast(Table, Quota.__table__)
# The owner's moderation override, read with the claim: a change applies to the jobs claimed next.
_POLICY = select(_quotas.c.moderation_policy).where(_quotas.c.user_id == _jobs.c.user_id).scalar_subquery()
_CLAIM = (
    update(_jobs)
    .where(
        _jobs.c.id == any_(bindparam("job_ids", type_=postgresql.ARRAY(_jobs.c.id.type))),
        _jobs.c.status == "queued",
        or_(_jobs.c.expires_at.is_(None), _jobs.c.expires_at > func.now()),
    )
    .values(status="running", started_at=func.now(), attempts=_jobs.c.attempts + 1, worker=bindparam("by"))
    .returning(*(_jobs.c[name] for name in Claimed.__dataclass_fields__ if name != "policy"), _POLICY)
)


def claim_many(*, session: Session | Connection, job_ids: Sequence[str], worker: str) -> list[Claimed | None]:
    """Take queued jobs for this worker (attempt + 1), in one statement; for each id, its job, or
    None when it is not queued (running elsewhere, terminal) or its deadline has passed. An id
    given twice is claimed once: the first gets the job."""
    rows = session.execute(_CLAIM, {"job_ids": list(set(job_ids)), "by": worker})
    claimed: dict[str, Claimed | None] = {row.id: Claimed(*row) for row in rows}
    return [claimed.pop(job_id, None) for job_id in job_ids]


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
    started_at: datetime | None


@dataclass(frozen=True)
class Queued:
    id: str
    variant: str
    priority: int
    user_id: str
    shared_priority: int | None


def running(*, session: Session) -> list[Running]:
    rows = session.execute(
        select(Job.id, Job.attempts, Job.worker, Job.started_at).where(Job.status == "running")
    )
    return [Running(*row) for row in rows]


def held_by(*, session: Session, attempts: dict[str, int], worker: str) -> set[str]:
    """Of the jobs (id → attempt), those running on `worker` at that attempt."""
    rows = session.execute(
        select(Job.id, Job.attempts).where(
            Job.id.in_(list(attempts)), Job.status == "running", Job.worker == worker
        )
    )
    return {job_id for job_id, attempt in rows if attempts.get(job_id) == attempt}


def past_deadline(*, session: Session, limit: int = 5000) -> list[str]:
    """Queued jobs whose deadline has passed (to expire: db/endings.py)."""
    stmt = select(Job.id).where(Job.status == "queued", Job.expires_at <= func.now()).limit(limit)
    return list(session.execute(stmt).scalars())


def queued_before(*, session: Session, cutoff: datetime, limit: int = 5000) -> list[Queued]:
    rows = session.execute(
        select(Job.id, Job.variant, Job.priority, Job.user_id, Job.shared_priority)
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
