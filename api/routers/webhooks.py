"""Webhooks: the caller's default target and signing secret, and the deliveries with their
attempts (sent by workers/webhooks.py; what is sent and how it is signed: core/webhooks.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from api.deps import SessionMakerDep, SettingsDep, UserDep
from api.errors import responses
from api.schemas import DeliveryList, WebhookSettings, WebhookSettingsIn, delivery_out
from core.errors import NotFound
from core.webhooks import check_target, new_secret
from db.repo import webhooks as webhooks_repo

router = APIRouter(prefix="/webhooks", tags=["webhooks"])


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
