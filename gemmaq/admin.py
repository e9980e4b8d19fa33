"""User, key and quota administration for the CLI and `gemmaq dev` (admin routes use the same repo)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncSession

from api.auth import MAX_AGE_S, renew_key_epoch
from core import redis_target
from core.broker import REDIS_CONNECT_TIMEOUT_S
from core.schemas import QuotaUpdate, UserOut
from core.settings import Settings
from db.repo import users as users_repo
from db.session import async_engine, make_async_sessionmaker

log = structlog.get_logger(__name__)


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
        key = await users_repo.create_key(session=session, user=user)
    await keys_changed(settings)  # no API process goes on taking it for an unknown key
    return key


async def create_key(settings: Settings, name: str) -> str:
    async with transaction(settings) as session:
        user = await users_repo.get_user_by_name(session=session, name=name)
        if user is None:
            raise SystemExit(f"no user {name!r}")
        key = await users_repo.create_key(session=session, user=user)
    await keys_changed(settings)
    return key


async def keys_changed(settings: Settings) -> None:
    """Running API processes read their callers' keys and quotas again (see api/auth.py)."""
    try:
        connect_s = REDIS_CONNECT_TIMEOUT_S
        redis = redis_target.async_client(
            settings.broker_url, max_connections=2, timeout=connect_s, socket_connect_timeout=connect_s
        )
        try:
            await renew_key_epoch(redis, settings)
        finally:
            await redis.aclose()
            await redis.connection_pool.disconnect()
    except (RedisError, RuntimeError) as exc:
        # Running API processes then see the change within MAX_AGE_S.
        log.warning("auth.epoch_renew_failed", error=type(exc).__name__, max_age_s=MAX_AGE_S)


async def revoke_key(settings: Settings, prefix: str) -> int:
    async with transaction(settings) as session:
        count = await users_repo.revoke_key(session=session, prefix=prefix)
    if count:
        await keys_changed(settings)
    return count


async def set_quota(settings: Settings, name: str, changes: QuotaUpdate) -> UserOut:
    async with transaction(settings) as session:
        user = await users_repo.get_user_by_name(session=session, name=name)
        if user is None:
            raise SystemExit(f"no user {name!r}")
        await users_repo.set_quota(session=session, user=user, changes=changes)
        out = (await users_repo.describe(session=session, users=[user]))[0]
    await keys_changed(settings)
    return out


async def list_users(settings: Settings) -> list[UserOut]:
    async with transaction(settings) as session:
        return await users_repo.describe(session=session, users=await users_repo.list_users(session=session))
