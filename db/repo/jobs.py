"""Job rows on the API's side (async): created, read, listed, cancelled while queued.

What workers and the reconciler do to a job is in `db.repo.runs`.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, cast

from sqlalchemy import RowMapping, Table, bindparam, delete, select, true
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session

from core.schemas import ACTIVE_STATUSES, TERMINAL_STATUSES, JobCreate
from db.ids import new_id
from db.models import Job, JobMetric, UsageLedger, User
from db.repo import pages

MAX_PAGE = 100
TERMINAL = sorted(TERMINAL_STATUSES)


# What the API reads of a job: its columns and its latest attempt's metrics (columns `m_*`), in
# one query. Statements are built once, so SQLAlchemy reuses their compiled form.
_jobs = cast(Table, Job.__table__)
_metrics = cast(Table, JobMetric.__table__)
METRICS = tuple(c.name for c in _metrics.c if c.name not in ("id", "job_id", "created_at"))
_OUT = (
    "id", "status", "variant", "task", "priority", "created_at", "started_at", "finished_at", "expires_at",
    "result", "error", "metadata", "attempts",
)  # fmt: skip
_latest = (
    select(*(_metrics.c[c] for c in METRICS))
    .where(_metrics.c.job_id == _jobs.c.id)
    .order_by(_metrics.c.attempt.desc())
    .limit(1)
    .lateral("latest")
)
_READ = select(*(_jobs.c[c] for c in _OUT), *(_latest.c[c].label(f"m_{c}") for c in METRICS)).select_from(
    _jobs.outerjoin(_latest, true())
)


def job_fields(job: RowMapping) -> dict[str, Any]:
    """A row of `_READ` (or one with the `_OUT` columns and no metrics) as plain fields: the job's
    columns, and its latest attempt's metrics under `metrics` (None before an attempt is recorded)."""
    metrics = None
    if job.get("m_attempt") is not None:
        metrics = {c: job[f"m_{c}"] for c in METRICS}
    return {c: job[c] for c in _OUT} | {"metrics": metrics}


# ---- API side ------------------------------------------------------------------------------


_INSERT = (
    pg_insert(_jobs)
    .on_conflict_do_nothing()
    .returning(*(_jobs.c[c] for c in (*_OUT, "idempotency_key", "request_hash")))
)
_IDEMPOTENT = select(*(_jobs.c[c] for c in (*_OUT, "idempotency_key", "request_hash"))).where(
    _jobs.c.user_id == bindparam("user_id"), _jobs.c.idempotency_key == bindparam("key")
)


async def find_idempotent(
    *, session: AsyncSession | AsyncConnection, user_id: str, idempotency_key: str
) -> RowMapping | None:
    rows = await session.execute(_IDEMPOTENT, {"user_id": user_id, "key": idempotency_key})
    return rows.mappings().first()


async def create_job(
    *,
    session: AsyncSession | AsyncConnection,
    user_id: str,
    spec: JobCreate,
    idempotency_key: str | None,
    request_hash: str,
    job_id: str | None = None,
    charged_on: date | None = None,
    reserved_tokens: int = 0,
    batch: tuple[str, int] | None = None,
    shared_priority: int | None = None,
) -> tuple[RowMapping, bool]:
    """Insert a queued job (one statement, its row returned); with an idempotency key already
    used, return that job instead. Rows carry the `_OUT` columns, the key and the request hash."""
    values: dict[str, Any] = {
        "id": job_id or new_id("job"),
        "user_id": user_id,
        "variant": spec.variant,
        "task": spec.task,
        "status": "queued",
        "priority": spec.priority,
        "shared_priority": spec.priority if shared_priority is None else shared_priority,
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
    if batch is not None:  # a batch's line: (batch id, line number)
        values["batch_id"], values["batch_line"] = batch
    statement = _INSERT
    if spec.webhook_url is None:  # the owner's default as it is now, not as a cache last saw it
        del values["webhook_url"]
        default = select(User.webhook_url).where(User.id == user_id).scalar_subquery()
        statement = _INSERT.values(webhook_url=default)
    inserted = (await session.execute(statement, values)).mappings().first()
    if inserted is not None:
        return inserted, True
    assert idempotency_key is not None  # nothing else can conflict with a new id
    existing = await find_idempotent(session=session, user_id=user_id, idempotency_key=idempotency_key)
    assert existing is not None
    return existing, False


_GET = _READ.where(_jobs.c.id == bindparam("job_id"), _jobs.c.user_id == bindparam("user_id"))


async def get_job(*, session: AsyncSession | AsyncConnection, user_id: str, job_id: str) -> RowMapping | None:
    """The caller's job with its latest metrics (one query); None when it is not theirs."""
    rows = await session.execute(_GET, {"job_id": job_id, "user_id": user_id})
    return rows.mappings().first()


def get_job_sync(*, session: Session | Connection, user_id: str, job_id: str) -> RowMapping | None:
    """`get_job` for a worker-side process (the webhook dispatcher)."""
    return session.execute(_GET, {"job_id": job_id, "user_id": user_id}).mappings().first()


@dataclass(frozen=True)
class Page:
    jobs: list[RowMapping]
    next_cursor: str | None


def _encode_cursor(job: RowMapping) -> str:
    raw = json.dumps([job["created_at"].isoformat(), job["id"]]).encode()
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
    session: AsyncSession | AsyncConnection,
    user_id: str,
    status: str | None,
    variant: str | None,
    cursor: tuple[datetime, str] | None,
    limit: int,
) -> Page:
    """The caller's jobs, newest first, each with its latest metrics."""
    stmt = _READ.where(_jobs.c.user_id == user_id)
    if status:
        stmt = stmt.where(_jobs.c.status == status)
    if variant:
        stmt = stmt.where(_jobs.c.variant == variant)
    stmt = pages.newest_first(stmt, _jobs.c.created_at, _jobs.c.id, cursor, limit)
    jobs = list((await session.execute(stmt)).mappings())
    more = len(jobs) > limit
    jobs = jobs[:limit]
    return Page(jobs=jobs, next_cursor=_encode_cursor(jobs[-1]) if more and jobs else None)


async def batch_jobs_page(
    *, session: AsyncSession, batch_id: str, after_line: int, limit: int
) -> list[RowMapping]:
    """A batch's jobs as the API shows them, with their line, in line order after `after_line`."""
    stmt = (
        _READ.add_columns(_jobs.c.batch_line)
        .where(_jobs.c.batch_id == batch_id, _jobs.c.batch_line > after_line)
        .order_by(_jobs.c.batch_line)
        .limit(limit)
    )
    return list((await session.execute(stmt)).mappings())


async def withdraw(*, session: AsyncSession, job_id: str) -> bool:
    """Delete a job whose message could not be sent — only while it is still queued."""
    stmt = delete(Job).where(Job.id == job_id, Job.status == "queued").returning(Job.id)
    return (await session.execute(stmt)).scalar_one_or_none() is not None


async def in_flight(*, session: AsyncSession, user_id: str) -> list[tuple[str, int, date]]:
    """The user's queued and running jobs: (id, tokens reserved at admission, the day charged)."""
    stmt = select(Job.id, Job.reserved_tokens, Job.charged_on).where(
        Job.user_id == user_id, Job.status.in_(ACTIVE_STATUSES)
    )
    return [(str(i), int(t or 0), d) for i, t, d in (await session.execute(stmt)).all() if d is not None]


async def ledger(*, session: AsyncSession, user_id: str, since: date) -> list[UsageLedger]:
    stmt = (
        select(UsageLedger)
        .where(UsageLedger.user_id == user_id, UsageLedger.day >= since)
        .order_by(UsageLedger.day.desc())
    )
    return list((await session.execute(stmt)).scalars())
