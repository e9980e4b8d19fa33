"""Users, their API keys (stored as SHA-256 hashes with a visible prefix) and their quotas."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import contains_eager

from core.schemas import AdminQuotaOut, QuotaUpdate, UserOut
from core.settings import Settings
from db.models import ApiKey, Quota, User

KEY_PREFIX = "gq_"
PREFIX_CHARS = 10


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def default_quota(settings: Settings) -> dict[str, Any]:
    return {
        "requests_per_minute": settings.quota_requests_per_minute,
        "tokens_per_day": settings.quota_tokens_per_day,
        "max_concurrent_jobs": settings.quota_max_concurrent_jobs,
        "max_input_bytes": settings.quota_max_input_bytes,
        "allowed_variants": None,
        "max_storage_bytes": settings.quota_max_storage_bytes,
        "max_files": settings.quota_max_files,
    }


async def get_user_by_name(*, session: AsyncSession, name: str) -> User | None:
    return (await session.execute(select(User).where(User.name == name))).scalar_one_or_none()


async def create_user(
    *,
    session: AsyncSession,
    name: str,
    settings: Settings,
    is_admin: bool = False,
    quota: QuotaUpdate | None = None,
) -> User:
    user = User(name=name, is_admin=is_admin)
    session.add(user)
    await session.flush()
    values = default_quota(settings) | (quota.model_dump(exclude_unset=True) if quota else {})
    session.add(Quota(user_id=user.id, **values))
    await session.flush()
    return user


async def set_quota(*, session: AsyncSession, user: User, changes: QuotaUpdate) -> None:
    values = changes.model_dump(exclude_unset=True)
    if values:
        await session.execute(update(Quota).where(Quota.user_id == user.id).values(**values))


async def create_key(*, session: AsyncSession, user: User, name: str | None = None) -> str:
    """Store a new key's hash and return the key itself: the only time it is seen."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(user_id=user.id, prefix=key[:PREFIX_CHARS], hash=hash_key(key), name=name))
    await session.flush()
    return key


def well_formed(key: str) -> bool:
    return key.startswith(KEY_PREFIX) and len(key) <= 200


async def authenticate(*, session: AsyncSession, key: str) -> User | None:
    if not well_formed(key):
        return None
    digest = hash_key(key)
    row = (
        await session.execute(
            select(User, ApiKey.hash)
            .join(ApiKey, ApiKey.user_id == User.id)
            .outerjoin(User.quota)
            .options(contains_eager(User.quota))
            .where(ApiKey.hash == digest, ApiKey.revoked_at.is_(None))
        )
    ).first()
    if row is None:
        return None
    user, stored = row
    if not hmac.compare_digest(stored, digest):
        return None
    return user


async def revoke_key(*, session: AsyncSession, prefix: str) -> int:
    """Revoke the unrevoked keys with this visible prefix; the next request with one is a 401."""
    result = await session.execute(
        update(ApiKey)
        .where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC))
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


async def describe(*, session: AsyncSession, users: Sequence[User]) -> list[UserOut]:
    ids = [u.id for u in users]
    quotas = {
        q.user_id: q for q in (await session.execute(select(Quota).where(Quota.user_id.in_(ids)))).scalars()
    }
    keys: dict[str, list[str]] = {}
    rows = await session.execute(
        select(ApiKey.user_id, ApiKey.prefix).where(ApiKey.user_id.in_(ids), ApiKey.revoked_at.is_(None))
    )
    for user_id, prefix in rows:
        keys.setdefault(user_id, []).append(prefix)
    out = []
    for user in users:
        quota = quotas.get(user.id)
        out.append(
            UserOut(
                id=user.id,
                name=user.name,
                is_admin=user.is_admin,
                created_at=user.created_at,
                quota=AdminQuotaOut.model_validate(quota, from_attributes=True) if quota else None,
                active_keys=keys.get(user.id, []),
            )
        )
    return out


async def list_users(*, session: AsyncSession) -> list[User]:
    return list((await session.execute(select(User).order_by(User.created_at))).scalars())
