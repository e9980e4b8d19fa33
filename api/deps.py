"""Dependencies as Annotated aliases: settings, sessions, Redis, the services on app.state, the
caller, and the flow of a caller's jobs.

Every one is `async def`: FastAPI runs a plain `def` dependency in its thread pool, a thread hop
per dependency per request for what is an attribute read."""

from __future__ import annotations

from typing import Annotated, Any

import structlog
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from api.auth import Caller
from api.cancels import Cancels
from api.flow import JobFlow
from api.holds import Holds
from api.middleware import MISSING_KEY, remember
from api.submission import Submitter
from api.waiting import DoneListener
from core.errors import Unauthorized
from core.quotas import AsyncQuotas
from core.settings import Settings
from core.variants import VariantRegistry
from db.models import User


def _on_state(name: str) -> Any:
    """The dependency that answers `app.state.<name>` (put there by create_app or its lifespan);
    the alias that uses it states its type."""

    async def get(request: Request) -> Any:
        return getattr(request.app.state, name)

    return Depends(get)


SettingsDep = Annotated[Settings, _on_state("settings")]
SessionMakerDep = Annotated[async_sessionmaker[AsyncSession], _on_state("sessionmaker")]
# Connections of this engine run each statement as its own transaction (one round trip).
AutocommitDep = Annotated[AsyncEngine, _on_state("autocommit")]
DoneDep = Annotated[DoneListener, _on_state("done")]
RedisDep = Annotated[Redis, _on_state("redis")]
VariantsDep = Annotated[VariantRegistry, _on_state("variants")]
HoldsDep = Annotated[Holds, _on_state("holds")]
QuotasDep = Annotated[AsyncQuotas, _on_state("quotas")]
SubmitterDep = Annotated[Submitter, _on_state("submitter")]
CancelsDep = Annotated[Cancels, _on_state("cancels")]

_bearer = HTTPBearer(auto_error=False, description="an API key made by `gemmaq users create`")


async def authenticate(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> User:
    """The caller api/middleware.py `KeyFirst` authenticated before the body was read (`credentials`
    is declared for the OpenAPI document's security scheme)."""
    caller: Caller | None = getattr(request.state, "caller", None)
    if caller is None:
        raise Unauthorized(MISSING_KEY)
    structlog.contextvars.bind_contextvars(user_id=caller.user.id)
    if caller.snapshot is not None:
        remember(request, caller.snapshot)
    return caller.user


UserDep = Annotated[User, Depends(authenticate)]


async def get_flow(request: Request, user: UserDep) -> JobFlow:
    state = request.app.state
    return JobFlow(
        request=request, user=user, submitter=state.submitter, cancels=state.cancels,
        autocommit=state.autocommit, redis=state.redis, settings=state.settings, done=state.done,
        holds=state.holds,
    )  # fmt: skip


FlowDep = Annotated[JobFlow, Depends(get_flow)]
