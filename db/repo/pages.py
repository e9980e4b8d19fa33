"""A user's rows a page at a time, newest first: keyset pagination on (created_at, id), both
descending, which the tables' (user_id, created_at, id) indexes serve."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol, TypeVar

from sqlalchemy import Select, SQLColumnExpression, and_, or_
from sqlalchemy.ext.asyncio import AsyncSession

S = TypeVar("S", bound=Select[Any])


class Dated(Protocol):
    """A row listed in pages: when it was created, and an id that breaks ties."""

    @property
    def id(self) -> str: ...

    @property
    def created_at(self) -> datetime: ...


M = TypeVar("M", bound=Dated)


def newest_first(
    stmt: S,
    created_at: SQLColumnExpression[datetime],
    id_: SQLColumnExpression[str],
    after: tuple[datetime, str] | None,
    limit: int,
) -> S:
    """`stmt`'s rows newest first, from just after `after` (a row's created_at and id): one more
    than `limit`, the sign that another page follows."""
    if after is not None:
        created, row_id = after
        stmt = stmt.where(or_(created_at < created, and_(created_at == created, id_ < row_id)))
    return stmt.order_by(created_at.desc(), id_.desc()).limit(limit + 1)


async def page(
    session: AsyncSession,
    stmt: Select[M],
    created_at: SQLColumnExpression[datetime],
    id_: SQLColumnExpression[str],
    after: M | None,
    limit: int,
) -> tuple[list[M], bool]:
    """`limit` of the rows `stmt` selects, newest first, from just after the row `after`; and
    whether more follow."""
    key = None if after is None else (after.created_at, after.id)
    rows = list((await session.execute(newest_first(stmt, created_at, id_, key, limit))).scalars())
    return rows[:limit], len(rows) > limit
