"""User, key and quota administration for the CLI and `gemmaq dev` (admin routes use the same repo)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncSession

from core.schemas import QuotaUpdate, UserOut
from core.settings import Settings
from db.repo import users as users_repo
from db.session import async_engine, make_async_sessionmaker


@asynccontextmanager
async def transaction(settings: Settings) -> AsyncIterator[AsyncSession]:
    engine = async_engine(settings.db_url)
    try:
        async with make_async_sessionmaker(engine)() as session, session.begin():
            yield session
    finally:
        await engine.dispose()


async def create_user_with_key(
    settings: Settings,
    name: str,
    *,
    admin: bool = False,
    reuse: bool = False,
    quota: QuotaUpdate | None = None,
) -> str:
    """Create `name` (or, with `reuse`, take the existing one) and return a new API key for it."""
    async with transaction(settings) as session:
        user = await users_repo.get_user_by_name(session=session, name=name)
        if user is not None and not reuse:
            raise SystemExit(f"user {name!r} already exists")
        if user is None:
            user = await users_repo.create_user(
                session=session, name=name, settings=settings, is_admin=admin, quota=quota
            )
        return await users_repo.create_key(session=session, user=user)


async def create_key(settings: Settings, name: str) -> str:
    async with transaction(settings) as session:
        user = await users_repo.get_user_by_name(session=session, name=name)
        if user is None:
            raise SystemExit(f"no user {name!r}")
        return await users_repo.create_key(session=session, user=user)


async def revoke_key(settings: Settings, prefix: str) -> int:
    async with transaction(settings) as session:
        return await users_repo.revoke_key(session=session, prefix=prefix)


async def set_quota(settings: Settings, name: str, changes: QuotaUpdate) -> UserOut:
    async with transaction(settings) as session:
        user = await users_repo.get_user_by_name(session=session, name=name)
        if user is None:
            raise SystemExit(f"no user {name!r}")
        await users_repo.set_quota(session=session, user=user, changes=changes)
        return (await users_repo.describe(session=session, users=[user]))[0]


async def list_users(settings: Settings) -> list[UserOut]:
    async with transaction(settings) as session:
        return await users_repo.describe(session=session, users=await users_repo.list_users(session=session))
