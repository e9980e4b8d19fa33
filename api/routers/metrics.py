"""`GET /metrics`: Prometheus text format, for the whole deployment from one scrape target
(api/prometheus.py); `GET /v1/metrics/summary`: success rate, latency, tokens/s and alerts over
the jobs that ended in a window (api/metrics_summary.py)."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from api import prometheus
from api.deps import AutocommitDep, RedisDep, SettingsDep, UserDep, VariantsDep
from api.errors import responses
from api.metrics_summary import parse_window, summarize
from api.schemas import Summary
from core.errors import Unauthorized, UnknownVariant

router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {"content": {prometheus.CONTENT_TYPE: {}}, "description": "Prometheus text format"},
        **responses(401),
    },
)
async def prometheus_metrics(
    request: Request, redis: RedisDep, autocommit: AutocommitDep, settings: SettingsDep, variants: VariantsDep
) -> Response:
    """With `GEMMAQ_METRICS_TOKEN` set, only for a scraper that sends it as a bearer token."""
    if settings.metrics_token:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip(), settings.metrics_token):
            raise Unauthorized("/metrics: send `Authorization: Bearer <GEMMAQ_METRICS_TOKEN>`")
    body = await prometheus.exposition(
        redis=redis, autocommit=autocommit, settings=settings, variants=variants.names()
    )
    return Response(body, media_type=prometheus.CONTENT_TYPE)


@router.get(
    "/v1/metrics/summary",
    responses=responses(401, 422, 503),
    summary="Success rate, latency, tokens/s and alerts over a window",
    tags=["metrics"],
)
async def metrics_summary(
    user: UserDep,
    autocommit: AutocommitDep,
    redis: RedisDep,
    settings: SettingsDep,
    variants: VariantsDep,
    variant: Annotated[str | None, Query(max_length=100, description="one variant; all when absent")] = None,
    window: Annotated[str, Query(max_length=12, description="e.g. 15m, 1h, 24h, 7d")] = "1h",
) -> Summary:
    if variant is not None and variant not in variants:
        raise UnknownVariant(
            f"unknown variant {variant!r}", {"variant": variant, "variants": variants.names()}
        )
    return await summarize(
        autocommit=autocommit,
        redis=redis,
        settings=settings,
        window_s=parse_window(window),
        user_id=None if user.is_admin else user.id,
        variant=variant,
    )
