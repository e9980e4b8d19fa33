"""Liveness and readiness probes."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import RedisDep, SessionMakerDep
from api.errors import ErrorResponse, error_response
from db.repo import health as health_repo

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: PostgreSQL and Redis answer",
    responses={503: {"model": ErrorResponse, "description": "a dependency is down"}},
)
async def readyz(maker: SessionMakerDep, redis: RedisDep) -> JSONResponse:
    checks: dict[str, str] = {}

    async def database() -> None:
        async with maker() as session:
            await health_repo.ping(session=session)

    for name, probe in (("postgres", database), ("redis", redis.ping)):
        try:
            await asyncio.wait_for(probe(), timeout=2)
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"down: {type(exc).__name__}"
    if all(v == "ok" for v in checks.values()):
        return JSONResponse({"status": "ready", "checks": checks})
    return error_response(503, "UNAVAILABLE", "a dependency is not answering", {"checks": checks})
