"""A job's run, on the workers' side (sync): claimed, finished, expired, or put back in the queue.

Every change is a conditional UPDATE, so a redelivered message, a second worker or the
reconciler can never move a job twice: a terminal status never changes again, and a
job's usage reaches the ledger in the one transaction that ends it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Connection, Table, any_, bindparam, func, or_, select, text, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.orm import Session

from core.errors import EXPIRED, GENERATION_ERROR
from core.metrics import Ended
from db.models import Job, JobMetric, Quota, UsageLedger
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


def claim(*, session: Session | Connection, job_id: str, worker: str) -> Claimed | None:
    """`claim_many` for one job."""
    return claim_many(session=session, job_ids=[job_id], worker=worker)[0]


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
    return charge_of(job, just_ended=False) if job is not None else None


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


def held_by(*, session: Session, attempts: dict[str, int], worker: str) -> set[str]:
    """Of the jobs (id → attempt), those running on `worker` at that attempt."""
    rows = session.execute(
        select(Job.id, Job.attempts).where(
            Job.id.in_(list(attempts)), Job.status == "running", Job.worker == worker
        )
    )
    return {job_id for job_id, attempt in rows if attempts.get(job_id) == attempt}


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


@dataclass(frozen=True)
class Outcome:
    """How one attempt of a job ended, as its worker writes it."""

    job_id: str
    attempt: int
    status: str
    result: dict[str, Any] | None
    error: dict[str, Any] | None
    metrics: dict[str, Any] | None


METRIC_COLUMNS = tuple(c.name for c in _metrics.c if c.name not in ("id", "job_id", "attempt", "created_at"))
_PG = postgresql.dialect()  # type: ignore[no-untyped-call]
_RECORD = ", ".join(f"{c} {_metrics.c[c].type.compile(dialect=_PG)}" for c in METRIC_COLUMNS)
# running → terminal for every outcome given, the usage they used added to the ledger and each
# attempt's metrics row written: one statement (data-modifying CTEs over the outcomes, passed
# as one JSON array), so one transaction and one round trip for a whole batch of jobs. Each job
# moves only if it is still running that attempt, so an outcome written before changes nothing.
_FINISH = text(f"""
WITH v AS (
  SELECT * FROM jsonb_to_recordset(CAST(:outcomes AS jsonb)) AS v(
    job_id text, attempt integer, status text, result jsonb, error jsonb,
    spent_in bigint, spent_out bigint, with_metrics boolean, {_RECORD})
), done AS (
  UPDATE jobs SET status = v.status, result = v.result, error = v.error, finished_at = now()
  FROM v WHERE jobs.id = v.job_id AND jobs.status = 'running' AND jobs.attempts = v.attempt
  RETURNING jobs.id, jobs.user_id, jobs.charged_on, jobs.variant
), usage AS (
  INSERT INTO usage_ledger AS ledger (user_id, day, input_tokens, output_tokens, jobs)
  SELECT done.user_id, done.charged_on, sum(v.spent_in), sum(v.spent_out), count(*)
  FROM done JOIN v ON v.job_id = done.id
  WHERE v.spent_in + v.spent_out > 0
  GROUP BY done.user_id, done.charged_on
  ON CONFLICT (user_id, day) DO UPDATE SET
    input_tokens = ledger.input_tokens + excluded.input_tokens,
    output_tokens = ledger.output_tokens + excluded.output_tokens,
    jobs = ledger.jobs + excluded.jobs,
    updated_at = now()
), metric AS (
  INSERT INTO job_metrics (job_id, attempt, {", ".join(METRIC_COLUMNS)})
  SELECT v.job_id, v.attempt, {", ".join(f"v.{c}" for c in METRIC_COLUMNS)}
  FROM v JOIN done ON done.id = v.job_id
  WHERE v.with_metrics
  ON CONFLICT ON CONSTRAINT uq_job_metrics_job_attempt DO NOTHING
)
SELECT id, user_id, charged_on, variant FROM done
""")


def finish_many(*, session: Session | Connection, outcomes: Sequence[Outcome]) -> list[Charge | None]:
    """Each job running → terminal, once, its usage added to the ledger in the same transaction
    (one statement for all). For each outcome, the job's charge, or None when the job had
    already left that attempt (a redelivery, a job finished or requeued meanwhile)."""
    rows = [_record(o) for o in outcomes]
    done = {
        job_id: (user_id, day, variant)
        for job_id, user_id, day, variant in session.execute(_FINISH, {"outcomes": json.dumps(rows)})
    }
    charges: list[Charge | None] = []
    for outcome, row in zip(outcomes, rows, strict=True):
        moved = done.get(row["job_id"])
        if moved is None:
            charges.append(None)
            continue
        user_id, day, variant = moved
        code = (outcome.error or {}).get("code")
        ended = Ended(outcome.job_id, variant, outcome.status, code, outcome.metrics)
        tokens = row["spent_in"] + row["spent_out"]
        charges.append(Charge(row["job_id"], user_id, day, tokens, ended))
    return charges


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
    """`finish_many` for one job."""
    outcome = Outcome(job_id, attempt, status, result, error, metrics)
    return finish_many(session=session, outcomes=[outcome])[0]


def _record(outcome: Outcome) -> dict[str, Any]:
    spent_in, spent_out = tokens_used(outcome.result)
    record = {
        "job_id": outcome.job_id,
        "attempt": outcome.attempt,
        "status": outcome.status,
        "result": outcome.result,
        "error": outcome.error,
        "spent_in": spent_in,
        "spent_out": spent_out,
        "with_metrics": outcome.metrics is not None,
    }
    metrics = outcome.metrics or {}
    unknown = set(metrics) - set(METRIC_COLUMNS)
    assert not unknown, f"not job_metrics columns: {sorted(unknown)}"
    for column in METRIC_COLUMNS:
        value = metrics.get(column)
        record[column] = None if isinstance(value, float) and not math.isfinite(value) else value
    return record
