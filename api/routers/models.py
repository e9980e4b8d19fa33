"""`GET /v1/models`: the OpenAI list shape, plus what gemmaq knows of each variant."""

from __future__ import annotations

from fastapi import APIRouter
from redis.exceptions import RedisError

from api.deps import RedisDep, SettingsDep, UserDep, VariantsDep
from api.errors import responses
from api.fleet import availability, live_workers, queue_depths, states_of
from core.openai_models import ModelList, ModelOut, WorkerState

router = APIRouter(tags=["models"])


@router.get("/models", responses=responses(401), summary="List variants")
async def list_models(
    user: UserDep, redis: RedisDep, settings: SettingsDep, variants: VariantsDep
) -> ModelList:
    try:
        workers = await live_workers(redis, settings)
    except RedisError:
        workers = []
    try:
        depths: dict[str, int] | None = await queue_depths(redis, settings, variants.names())
    except RedisError:
        depths = None
    data = []
    for v in variants:
        states = [WorkerState(**s) for s in states_of(v.name, workers)]
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
            )
        )
    return ModelList(data=data)
