"""Dependencies as Annotated aliases: settings, sessions, Redis, the broker, the caller."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import structlog
from celery import Celery
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from api import quota as quota_admission
from core.errors import Unauthorized
from core.quotas import AsyncQuotas
from core.settings import Settings
from core.variants import VariantRegistry
from db.models import User
from db.repo import users as users_repo


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_sessionmaker(request: Request) -> async_sessionmaker[AsyncSession]:
    maker: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    return maker


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with get_sessionmaker(request)() as session:
        yield session


def get_redis(request: Request) -> Redis:
    redis: Redis = request.app.state.redis
    return redis


def get_broker(request: Request) -> Celery:
    broker: Celery = request.app.state.broker
    return broker


def get_quotas(request: Request) -> AsyncQuotas:
    quotas: AsyncQuotas = request.app.state.quotas
    return quotas


def get_variants(request: Request) -> VariantRegistry:
    variants: VariantRegistry = request.app.state.variants
    return variants


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]
SessionMakerDep = Annotated[async_sessionmaker[AsyncSession], Depends(get_sessionmaker)]
RedisDep = Annotated[Redis, Depends(get_redis)]
BrokerDep = Annotated[Celery, Depends(get_broker)]
VariantsDep = Annotated[VariantRegistry, Depends(get_variants)]
QuotasDep = Annotated[AsyncQuotas, Depends(get_quotas)]

_bearer = HTTPBearer(auto_error=False, description="an API key made by `gemmaq users create`")


async def authenticate(
    request: Request,
    maker: SessionMakerDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> User:
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
    async with maker() as session:
        user = await users_repo.authenticate(session=session, key=credentials.credentials)
    if user is None:
        raise Unauthorized("invalid or revoked API key")
    structlog.contextvars.bind_contextvars(user_id=user.id)
    await quota_admission.peek(request, get_quotas(request), user, get_settings_dep(request))
    return user


UserDep = Annotated[User, Depends(authenticate)]
