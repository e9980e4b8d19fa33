"""Batches (the OpenAI Batch API) on the API's side: created, read, listed, and worked on by the
batch runner (api/batch_runner.py) — one batch at a time, locked, turns going round."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, func, literal, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, aliased, contains_eager

from core.schemas import ACTIVE_STATUSES, BATCH_WORKING
from db.models import Batch, BatchLineError, Job, User
from db.repo import pages

MAX_PAGE = 100
WORKING = BATCH_WORKING
PENDING = ACTIVE_STATUSES


async def create_batch(
    *,
    session: AsyncSession,
    user_id: str,
    input_file_id: str,
    endpoint: str,
    completion_window: str,
    metadata: dict[str, str],
    total: int,
    expires_at: datetime,
    webhook_url: str | None = None,
) -> Batch:
    batch = Batch(
        user_id=user_id, input_file_id=input_file_id, endpoint=endpoint, completion_window=completion_window,
        status="validating", metadata_=metadata, total=total, next_part=0, next_line=0, submitted=0,
        expires_at=expires_at, webhook_url=webhook_url,
    )  # fmt: skip
    session.add(batch)
    await session.flush()
    await session.refresh(batch)
    return batch


async def get_batch(
    *, session: AsyncSession, user_id: str, batch_id: str, lock: bool = False
) -> Batch | None:
    stmt = select(Batch).where(Batch.id == batch_id, Batch.user_id == user_id)
    if lock:  # FOR NO KEY UPDATE: the batch's jobs (a foreign key to it) can still be inserted
        stmt = stmt.with_for_update(key_share=True)
    return (await session.execute(stmt)).scalar_one_or_none()


async def list_batches(
    *, session: AsyncSession, user_id: str, after: Batch | None, limit: int
) -> tuple[list[Batch], bool]:
    stmt = select(Batch).where(Batch.user_id == user_id)
    return await pages.page(session, stmt, Batch.created_at, Batch.id, after, limit)


def _count_statements(batch_ids: Sequence[str]) -> tuple[Select[Any, Any, Any], Select[Any, Any, Any]]:
    jobs = (
        select(Job.batch_id, Job.status, func.count())
        .where(Job.batch_id.in_(batch_ids))
        .group_by(Job.batch_id, Job.status)
    )
    errors = (
        select(BatchLineError.batch_id, literal("line_errors"), func.count())
        .where(BatchLineError.batch_id.in_(batch_ids))
        .group_by(BatchLineError.batch_id)
    )
    return jobs, errors


def counts_sync(*, session: Session, batch_id: str) -> dict[str, int]:
    """`counts` for one batch, for a worker-side process (the webhook dispatcher)."""
    out: dict[str, int] = {}
    for statement in _count_statements([batch_id]):
        for _, key, n in session.execute(statement):
            out[str(key)] = int(n)
    return out


async def counts(*, session: AsyncSession, batch_ids: Sequence[str]) -> dict[str, dict[str, int]]:
    """For each batch: its jobs by status, and `line_errors`."""
    out: dict[str, dict[str, int]] = {b: {} for b in batch_ids}
    if not batch_ids:
        return out
    for statement in _count_statements(batch_ids):
        for batch_id, key, n in await session.execute(statement):
            out[str(batch_id)][str(key)] = int(n)
    return out


async def lock_next(*, session: AsyncSession) -> Batch | None:
    """The batch whose turn it is, locked for this transaction; batches another runner holds,
    and batches told to wait (`next_turn_at`), are skipped. Turns go round the owners first —
    the owner whose latest turn is oldest — then round that owner's batches, so a user with a
    hundred batches gets no more turns than a user with one."""
    other = aliased(Batch)
    owners_turn = (
        select(func.max(other.worked_at))
        .where(other.user_id == Batch.user_id, other.status.in_(WORKING))
        .scalar_subquery()
    )
    stmt = (
        select(Batch)
        .where(Batch.status.in_(WORKING), or_(Batch.next_turn_at.is_(None), Batch.next_turn_at <= func.now()))
        .order_by(
            owners_turn.asc().nulls_first(), Batch.worked_at.asc().nulls_first(), Batch.created_at, Batch.id
        )
        .limit(1)
        .with_for_update(skip_locked=True, key_share=True, of=Batch)  # as in get_batch
    )
    return (await session.execute(stmt)).scalar_one_or_none()


async def put_off(*, session: AsyncSession, batch_id: str, seconds: float) -> None:
    """No turn for `batch_id` in the next `seconds` (a turn that failed, in its own transaction)."""
    await session.execute(
        update(Batch)
        .where(Batch.id == batch_id)
        .values(worked_at=func.now(), next_turn_at=func.now() + timedelta(seconds=seconds))
    )


async def owner(*, session: AsyncSession, user_id: str) -> User | None:
    stmt = select(User).outerjoin(User.quota).options(contains_eager(User.quota)).where(User.id == user_id)
    return (await session.execute(stmt)).unique().scalar_one_or_none()


async def add_line_error(
    *, session: AsyncSession, batch_id: str, line: int, custom_id: str | None, code: str, message: str
) -> None:
    await session.execute(
        pg_insert(BatchLineError)
        .values(
            batch_id=batch_id,
            line=line,
            custom_id=custom_id and _text(custom_id),
            code=code,
            message=_text(message)[:2000],
        )
        .on_conflict_do_nothing()
    )


def _text(value: str) -> str:
    """A user's text as PostgreSQL stores it (no NUL, no lone surrogate), for the error file."""
    return value.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


async def job_ids(*, session: AsyncSession, batch_id: str, status: str, limit: int) -> list[str]:
    stmt = select(Job.id).where(Job.batch_id == batch_id, Job.status == status).limit(limit)
    return list((await session.execute(stmt)).scalars())


async def line_errors(
    *, session: AsyncSession, batch_id: str, after_line: int, limit: int
) -> list[BatchLineError]:
    stmt = (
        select(BatchLineError)
        .where(BatchLineError.batch_id == batch_id, BatchLineError.line > after_line)
        .order_by(BatchLineError.line)
        .limit(limit)
    )
    return list((await session.execute(stmt)).scalars())
