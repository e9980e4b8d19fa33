"""The database's part of the readiness probe."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession


async def ping(*, session: AsyncSession | AsyncConnection) -> None:
    """One round trip: raises when PostgreSQL does not answer."""
    await session.execute(text("SELECT 1"))
