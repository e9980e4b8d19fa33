"""Admin routes: users, quotas and keys. Admins only; anyone else gets 403."""

from __future__ import annotations

from typing import Annotated

import structlog
from fastapi import APIRouter, Depends, status
from redis.exceptions import RedisError

from api.auth import MAX_AGE_S, renew_key_epoch
from api.deps import RedisDep, SessionMakerDep, SettingsDep, UserDep
from api.errors import responses
from core.errors import Conflict, Forbidden, NotFound
from core.schemas import KeyCreated, QuotaUpdate, UserCreate, UserOut
from db.models import User
from db.repo import users as users_repo


async def require_admin(user: UserDep) -> User:
    if not user.is_admin:
        raise Forbidden("this route is for admins")
    return user


AdminDep = Annotated[User, Depends(require_admin)]
log = structlog.get_logger(__name__)
router = APIRouter(prefix="/admin", tags=["admin"], responses=responses(401, 403))


@router.get("/users", summary="Users with their quotas and active key prefixes")
async def list_users(admin: AdminDep, maker: SessionMakerDep) -> list[UserOut]:
    async with maker() as session:
        return await users_repo.describe(session=session, users=await users_repo.list_users(session=session))


@router.post(
    "/users",
    status_code=status.HTTP_201_CREATED,
    responses=responses(409, 422),
    summary="Create a user and a key",
)
async def create_user(
    body: UserCreate, admin: AdminDep, maker: SessionMakerDep, redis: RedisDep, settings: SettingsDep
) -> KeyCreated:
    async with maker() as session, session.begin():
        if await users_repo.get_user_by_name(session=session, name=body.name) is not None:
            raise Conflict(f"user {body.name!r} already exists")
        user = await users_repo.create_user(
            session=session, name=body.name, settings=settings, is_admin=body.is_admin, quota=body.quota
        )
        key = await users_repo.create_key(session=session, user=user)
    await _keys_changed(redis, settings)  # no API process goes on taking it for an unknown key
    return KeyCreated(user=user.name, prefix=key[: users_repo.PREFIX_CHARS], key=key)


async def _named(maker: SessionMakerDep, name: str) -> User:
    async with maker() as session:
        user = await users_repo.get_user_by_name(session=session, name=name)
    if user is None:
        raise NotFound(f"no user {name!r}")
    return user


async def _keys_changed(redis: RedisDep, settings: SettingsDep) -> None:
    """Every API process reads its callers' keys and quotas again (see api/auth.py)."""
    try:
        await renew_key_epoch(redis, settings)
    except RedisError:
        log.warning("auth.epoch_renew_failed", max_age_s=MAX_AGE_S)


@router.patch("/users/{name}/quota", responses=responses(404, 422), summary="Change a user's quota")
async def set_quota(
    name: str,
    changes: QuotaUpdate,
    admin: AdminDep,
    maker: SessionMakerDep,
    redis: RedisDep,
    settings: SettingsDep,
) -> UserOut:
    user = await _named(maker, name)
    async with maker() as session, session.begin():
        await users_repo.set_quota(session=session, user=user, changes=changes)
    await _keys_changed(redis, settings)
    async with maker() as session:
        return (await users_repo.describe(session=session, users=[user]))[0]


@router.post(
    "/users/{name}/keys", status_code=status.HTTP_201_CREATED, responses=responses(404), summary="A new key"
)
async def create_key(
    name: str, admin: AdminDep, maker: SessionMakerDep, redis: RedisDep, settings: SettingsDep
) -> KeyCreated:
    user = await _named(maker, name)
    async with maker() as session, session.begin():
        key = await users_repo.create_key(session=session, user=user)
    await _keys_changed(redis, settings)
    return KeyCreated(user=user.name, prefix=key[: users_repo.PREFIX_CHARS], key=key)


@router.post("/keys/{prefix}/revoke", responses=responses(404), summary="Revoke a key by its visible prefix")
async def revoke_key(
    prefix: str, admin: AdminDep, maker: SessionMakerDep, redis: RedisDep, settings: SettingsDep
) -> dict[str, int]:
    async with maker() as session, session.begin():
        count = await users_repo.revoke_key(session=session, prefix=prefix)
    if count:
        await _keys_changed(redis, settings)
    if not count:
        raise NotFound(f"no active key with prefix {prefix!r}")
    return {"revoked": count}
