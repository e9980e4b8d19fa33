"""Dependencies as Annotated aliases: settings, sessions, Redis, the broker, the caller.

Every one is `async def`: FastAPI runs a plain `def` dependency in its thread pool, a thread hop
per dependency per request for what is an attribute read."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import structlog
from celery import Celery
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from api.auth import Caller
from api.fleet_view import FleetView
from api.holds import Holds
from api.limits import MISSING_KEY
from api.quota import remember
from api.waiting import DoneListener
from core.errors import Unauthorized
from core.quotas import AsyncQuotas
from core.settings import Settings
from core.variants import VariantRegistry
from db.models import User


async def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_sessionmaker(request: Request) -> async_sessionmaker[AsyncSession]:
    maker: async_sessionmaker[AsyncSession] = request.app.state.sessionmaker
    return maker


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with (await get_sessionmaker(request))() as session:
        yield session


async def get_redis(request: Request) -> Redis:
    redis: Redis = request.app.state.redis
    return redis


async def get_broker(request: Request) -> Celery:
    broker: Celery = request.app.state.broker
    return broker


async def get_quotas(request: Request) -> AsyncQuotas:
    quotas: AsyncQuotas = request.app.state.quotas
    return quotas


async def get_autocommit(request: Request) -> AsyncEngine:
    engine: AsyncEngine = request.app.state.autocommit
    return engine


async def get_fleet(request: Request) -> FleetView:
    fleet: FleetView = request.app.state.fleet
    return fleet


async def get_done(request: Request) -> DoneListener:
    done: DoneListener = request.app.state.done
    return done


async def get_holds(request: Request) -> Holds:
    holds: Holds = request.app.state.holds
    return holds


async def get_variants(request: Request) -> VariantRegistry:
    variants: VariantRegistry = request.app.state.variants
    return variants


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]
SessionMakerDep = Annotated[async_sessionmaker[AsyncSession], Depends(get_sessionmaker)]
# Connections of this engine run each statement as its own transaction (one round trip).
AutocommitDep = Annotated[AsyncEngine, Depends(get_autocommit)]
FleetDep = Annotated[FleetView, Depends(get_fleet)]
DoneDep = Annotated[DoneListener, Depends(get_done)]
RedisDep = Annotated[Redis, Depends(get_redis)]
BrokerDep = Annotated[Celery, Depends(get_broker)]
VariantsDep = Annotated[VariantRegistry, Depends(get_variants)]
HoldsDep = Annotated[Holds, Depends(get_holds)]
QuotasDep = Annotated[AsyncQuotas, Depends(get_quotas)]

_bearer = HTTPBearer(auto_error=False, description="an API key made by `gemmaq users create`")


async def authenticate(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> User:
    """The caller api/limits.py `KeyFirst` authenticated before the body was read (`credentials`
    is declared for the OpenAPI document's security scheme)."""
    caller: Caller | None = getattr(request.state, "caller", None)
    if caller is None:
        raise Unauthorized(MISSING_KEY)
    structlog.contextvars.bind_contextvars(user_id=caller.user.id)
    if caller.snapshot is not None:
        remember(request, caller.snapshot)
    return caller.user


UserDep = Annotated[User, Depends(authenticate)]
