"""`GET /v1/models`: the OpenAI list shape, plus what gemmaq knows of each variant."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from redis.exceptions import RedisError

from api.deps import RedisDep, SessionMakerDep, SettingsDep, UserDep, VariantsDep
from api.errors import responses
from api.fleet import availability, live_workers, queue_depths, states_of
from core.openai_models import AdapterCache, ModelAdapter, ModelList, ModelOut, WorkerState
from db.repo import adapters as adapters_repo

router = APIRouter(tags=["models"])


@router.get("/models", responses=responses(401), summary="List variants")
async def list_models(
    user: UserDep, redis: RedisDep, settings: SettingsDep, variants: VariantsDep, maker: SessionMakerDep
) -> ModelList:
    try:
        workers = await live_workers(redis, settings)
    except RedisError:
        workers = []
    try:
        depths: dict[str, int] | None = await queue_depths(redis, settings, variants.names())
    except RedisError:
        depths = None
    async with maker() as session:
        usable = await adapters_repo.list_visible(session=session, user_id=user.id)
    data = []
    for v in variants:
        found = states_of(v.name, workers)
        states = [WorkerState(**s, adapter_cache=_cache(s.get("adapters"))) for s in found]
        adapters = [
            ModelAdapter(
                id=a.id,
                name=a.name,
                owned=a.user_id == user.id,
                loaded_on=[s["worker"] for s in found if a.id in (s.get("adapters") or {}).get("loaded", [])],
            )
            for a in usable
            if a.base == v.name
        ]
        problem = availability(v, variants, workers)
        depth = depths[v.name] if depths is not None else None
        data.append(
            ModelOut(
                id=v.name,
                owned_by="gemmaq" if v.diagnostic else "google",
                family=v.family,
                size=v.size,
                tasks=list(v.tasks),
                dtype=v.dtype,
                quantization=v.quantization,
                diagnostic=v.diagnostic,
                description=v.description or (v.hf_id or ""),
                max_new_tokens=v.max_new_tokens,
                max_batch_size=v.max_batch_size,
                available=problem is None,
                unavailable_reason=problem,
                workers=states,
                queue_depth=depth,
                adapters=adapters,
            )
        )
    return ModelList(data=data)


def _cache(report: dict[str, Any] | None) -> AdapterCache | None:
    """A worker's adapter cache without the ids it holds (those of other tenants' adapters)."""
    if report is None:
        return None
    return AdapterCache(
        adapters=len(report["loaded"]), bytes=report["bytes"], budget_bytes=report["budget_bytes"],
        loads=report["loads"], evictions=report["evictions"],
    )  # fmt: skip
