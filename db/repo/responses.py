"""Stored responses (the Responses API), each its owner's only: another user's id reads as absent."""

from __future__ import annotations

from sqlalchemy import delete, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from db.models import StoredResponse

# A response past its expires_at is gone for its owner at once; the reconciler deletes it later.
LIVE = or_(StoredResponse.expires_at.is_(None), StoredResponse.expires_at > func.now())


async def add(*, session: AsyncSession, row: StoredResponse) -> None:
    session.add(row)
    await session.flush()


async def get(*, session: AsyncSession, user_id: str, response_id: str) -> StoredResponse | None:
    query = select(StoredResponse).where(
        StoredResponse.id == response_id, StoredResponse.user_id == user_id, LIVE
    )
    return (await session.execute(query)).scalar_one_or_none()


async def remove(*, session: AsyncSession, user_id: str, response_id: str) -> bool:
    query = delete(StoredResponse).where(StoredResponse.id == response_id, StoredResponse.user_id == user_id)
    return bool((await session.execute(query)).rowcount)  # type: ignore[attr-defined]


def of_job_sync(*, session: Session, job_id: str) -> StoredResponse | None:
    """The stored response a job generates (the webhook dispatcher's read)."""
    return session.execute(select(StoredResponse).where(StoredResponse.job_id == job_id)).scalar_one_or_none()


def delete_expired(*, session: Session, limit: int = 200) -> int:
    """Responses past their expires_at (the reconciler)."""
    expired = (
        select(StoredResponse.id)
        .where(StoredResponse.expires_at <= func.now())
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    result = session.execute(delete(StoredResponse).where(StoredResponse.id.in_(expired.scalar_subquery())))
    return int(result.rowcount)  # type: ignore[attr-defined]
