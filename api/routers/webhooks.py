"""Webhooks: the caller's default target and signing secret, and the deliveries with their
attempts (sent by workers/webhooks.py; what is sent and how it is signed: core/webhooks.py)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from api.deps import SessionMakerDep, SettingsDep, UserDep
from api.errors import responses
from core.errors import NotFound
from core.schemas import SafeStr
from core.webhooks import check_target, new_secret
from db.models import WebhookDelivery
from db.repo import webhooks as webhooks_repo

router = APIRouter(prefix="/webhooks", tags=["webhooks"])


class WebhookSettings(BaseModel):
    default_url: str | None = Field(description="where jobs without their own webhook_url report")
    secret: str = Field(description="verify deliveries with it (Standard Webhooks, `whsec_…`)")
    events: list[str] = ["job.succeeded", "job.failed", "job.cancelled"]


class WebhookSettingsIn(BaseModel):
    default_url: SafeStr | None = Field(max_length=2000, description="null: no default")


class Attempt(BaseModel):
    at: datetime
    status_code: int | None
    error: str | None
    ms: float


class DeliveryOut(BaseModel):
    id: str = Field(description="the webhook-id header of every attempt")
    object: Literal["webhook.delivery"] = "webhook.delivery"
    event: str
    job_id: str | None
    batch_id: str | None
    url: str
    status: Literal["pending", "delivered", "failed"]
    attempts: list[Attempt]
    next_attempt_at: datetime | None
    created_at: datetime
    delivered_at: datetime | None


class DeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DeliveryOut]
    has_more: bool


def delivery_out(d: WebhookDelivery) -> DeliveryOut:
    history: list[dict[str, Any]] = d.history or []
    return DeliveryOut(
        id=d.id,
        event=d.event,
        job_id=d.job_id,
        batch_id=d.batch_id,
        url=d.url,
        status=d.status,
        attempts=[Attempt(**a) for a in history],
        next_attempt_at=d.next_attempt_at if d.status == "pending" else None,
        created_at=d.created_at,
        delivered_at=d.delivered_at,
    )


@router.get("/settings", responses=responses(401), summary="Your default webhook URL and signing secret")
async def get_settings(user: UserDep, maker: SessionMakerDep) -> WebhookSettings:
    async with maker() as session, session.begin():
        url, secret = await webhooks_repo.settings_of(
            session=session, user_id=user.id, new_secret=new_secret()
        )
    return WebhookSettings(default_url=url, secret=secret)


@router.put("/settings", responses=responses(401, 422), summary="Set your default webhook URL")
async def put_settings(
    body: WebhookSettingsIn, user: UserDep, maker: SessionMakerDep, settings: SettingsDep
) -> WebhookSettings:
    """Jobs and batches submitted from now on, by any API process, take the new default (it is
    read with each submission, not from a cache)."""
    if body.default_url is not None:
        await run_in_threadpool(check_target, body.default_url, settings)
    async with maker() as session, session.begin():
        await webhooks_repo.set_default_url(session=session, user_id=user.id, url=body.default_url)
        url, secret = await webhooks_repo.settings_of(
            session=session, user_id=user.id, new_secret=new_secret()
        )
    return WebhookSettings(default_url=url, secret=secret)


@router.get(
    "/deliveries", responses=responses(401, 404, 422), summary="Webhook deliveries and their attempts"
)
async def list_deliveries(
    user: UserDep,
    maker: SessionMakerDep,
    job_id: Annotated[str | None, Query(max_length=40)] = None,
    batch_id: Annotated[str | None, Query(max_length=40)] = None,
    after: Annotated[str | None, Query(max_length=40, description="a delivery id: the page after it")] = None,
    limit: Annotated[int, Query(ge=1, le=webhooks_repo.MAX_PAGE)] = 20,
) -> DeliveryList:
    """Newest first."""
    async with maker() as session:
        cursor = None
        if after is not None:
            cursor = await webhooks_repo.get_delivery(session=session, user_id=user.id, delivery_id=after)
            if cursor is None:
                raise NotFound(f"no delivery {after!r}")
        rows, more = await webhooks_repo.list_deliveries(
            session=session, user_id=user.id, job_id=job_id, batch_id=batch_id, after=cursor, limit=limit
        )
    return DeliveryList(data=[delivery_out(d) for d in rows], has_more=more)
