"""A job's run, on the workers' side (sync): claimed, finished, expired, or put back in the queue.

Every change is a conditional UPDATE, so a redelivered message, a second worker or the
reconciler can never move a job twice: a terminal status never changes again, and a
job's usage reaches the ledger in the one transaction that ends it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Connection, Select, Table, bindparam, func, literal, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from core.errors import EXPIRED, GENERATION_ERROR
from db.models import Job, JobMetric, UsageLedger
from db.repo.jobs import TERMINAL as TERMINAL
from db.repo.jobs import Charge, charge_of, tokens_used

# The two statements every job runs are built once (SQLAlchemy then reuses their compiled form)
# and each is one round trip: on an autocommit connection, one statement is one transaction.
_jobs = cast(Table, Job.__table__)
_metrics = cast(Table, JobMetric.__table__)
_ledger = cast(Table, UsageLedger.__table__)


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


_CLAIM = (
    update(_jobs)
    .where(
        _jobs.c.id == bindparam("job_id"),
        _jobs.c.status == "queued",
        or_(_jobs.c.expires_at.is_(None), _jobs.c.expires_at > func.now()),
    )
    .values(status="running", started_at=func.now(), attempts=_jobs.c.attempts + 1, worker=bindparam("by"))
    .returning(*(_jobs.c[name] for name in Claimed.__dataclass_fields__))
)


def claim(*, session: Session | Connection, job_id: str, worker: str) -> Claimed | None:
    """Take a queued job for this worker (attempt + 1); None when it is not queued (running
    elsewhere, terminal) or its deadline has passed."""
    row = session.execute(_CLAIM, {"job_id": job_id, "by": worker}).first()
    return Claimed(*row) if row is not None else None


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
    user_id: str


def running(*, session: Session) -> list[Running]:
    rows = session.execute(select(Job.id, Job.attempts, Job.worker).where(Job.status == "running"))
    return [Running(*row) for row in rows]


def queued_before(*, session: Session, cutoff: datetime, limit: int = 5000) -> list[Queued]:
    rows = session.execute(
        select(Job.id, Job.variant, Job.priority, Job.user_id)
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


def _finish_statement(with_metrics: bool) -> Select[Any]:
    """running → terminal, the usage added to the ledger and the attempt's metrics row written:
    one statement (data-modifying CTEs), so one transaction and one round trip."""
    done = (
        update(_jobs)
        .where(
            _jobs.c.id == bindparam("job_id"),
            _jobs.c.status == "running",
            _jobs.c.attempts == bindparam("attempt"),
        )
        .values(
            status=bindparam("to", type_=_jobs.c.status.type),
            result=bindparam("body", type_=_jobs.c.result.type),
            error=bindparam("problem", type_=_jobs.c.error.type),
            finished_at=func.now(),
        )
        .returning(_jobs.c.user_id, _jobs.c.charged_on)
        .cte("done")
    )
    spent = pg_insert(_ledger).from_select(
        ["user_id", "day", "input_tokens", "output_tokens", "jobs"],
        select(
            done.c.user_id,
            done.c.charged_on,
            bindparam("spent_in", type_=_ledger.c.input_tokens.type),
            bindparam("spent_out", type_=_ledger.c.output_tokens.type),
            literal(1),
        ).where(bindparam("charged", type_=_ledger.c.jobs.type) > 0),
    )
    usage = spent.on_conflict_do_update(
        index_elements=[_ledger.c.user_id, _ledger.c.day],
        set_={
            "input_tokens": _ledger.c.input_tokens + spent.excluded.input_tokens,
            "output_tokens": _ledger.c.output_tokens + spent.excluded.output_tokens,
            "jobs": _ledger.c.jobs + 1,
            "updated_at": func.now(),
        },
    ).cte("usage")
    ctes = [usage]
    if with_metrics:
        columns = ["job_id", "attempt", *METRIC_COLUMNS]
        values = [
            bindparam("job_id", type_=_metrics.c.job_id.type),
            bindparam("attempt", type_=_metrics.c.attempt.type),
            *(bindparam(f"m_{c}", type_=_metrics.c[c].type) for c in METRIC_COLUMNS),
        ]
        metric = (
            pg_insert(_metrics)
            .from_select(columns, select(*values).select_from(done))
            .on_conflict_do_nothing(constraint="uq_job_metrics_job_attempt")
            .cte("metric")
        )
        ctes.append(metric)
    return select(done.c.user_id, done.c.charged_on).add_cte(*ctes)


METRIC_COLUMNS = tuple(c.name for c in _metrics.c if c.name not in ("id", "job_id", "attempt", "created_at"))
_FINISH = {with_metrics: _finish_statement(with_metrics) for with_metrics in (False, True)}


def finish(
    *,
    session: Session | Connection,
    job_id: str,
    attempt: int,
    status: str,
    result: dict[str, Any] | None,
    error: dict[str, Any] | None,
    metrics: dict[str, Any] | None,
) -> Charge | None:
    """running → terminal, once, with its usage added to the ledger in the same transaction.
    None when the job was already finished (a redelivery)."""
    input_tokens, output_tokens = tokens_used(result)
    params: dict[str, Any] = {
        "job_id": job_id,
        "attempt": attempt,
        "to": status,
        "body": result,
        "problem": error,
        "spent_in": input_tokens,
        "spent_out": output_tokens,
        "charged": input_tokens + output_tokens,
    }
    if metrics is not None:
        unknown = set(metrics) - set(METRIC_COLUMNS)
        assert not unknown, f"not job_metrics columns: {sorted(unknown)}"
        params |= {f"m_{c}": metrics.get(c) for c in METRIC_COLUMNS}
    row = session.execute(_FINISH[metrics is not None], params).first()
    if row is None:
        return None
    user_id, day = row
    return Charge(job_id=job_id, user_id=user_id, day=day, tokens=input_tokens + output_tokens)
