"""Stored responses (the Responses API), each its owner's only: another user's id reads as absent."""

from __future__ import annotations

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from db.models import StoredResponse


async def add(*, session: AsyncSession, row: StoredResponse) -> None:
    session.add(row)
    await session.flush()


async def get(*, session: AsyncSession, user_id: str, response_id: str) -> StoredResponse | None:
    query = select(StoredResponse).where(StoredResponse.id == response_id, StoredResponse.user_id == user_id)
    return (await session.execute(query)).scalar_one_or_none()


async def remove(*, session: AsyncSession, user_id: str, response_id: str) -> bool:
    query = delete(StoredResponse).where(StoredResponse.id == response_id, StoredResponse.user_id == user_id)
    return bool((await session.execute(query)).rowcount)  # type: ignore[attr-defined]


def of_job_sync(*, session: Session, job_id: str) -> StoredResponse | None:
    """The stored response a job generates (the webhook dispatcher's read)."""
    return session.execute(select(StoredResponse).where(StoredResponse.job_id == job_id)).scalar_one_or_none()
