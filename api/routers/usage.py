"""The caller's limits, their use in the current windows, and per-day token use from the ledger."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Query

from api import admission
from api.deps import QuotasDep, SessionMakerDep, SettingsDep, UserDep
from api.errors import responses
from core import quotas
from core.schemas import (
    ConcurrencyWindow,
    DayUsage,
    QuotaOut,
    RequestWindow,
    StorageWindow,
    TokenWindow,
    UsageOut,
)
from db.repo import files as files_repo
from db.repo import jobs as jobs_repo

router = APIRouter(tags=["usage"])


@router.get("/usage", responses=responses(401, 422, 503), summary="Your limits, use and reset times")
async def usage(
    user: UserDep,
    maker: SessionMakerDep,
    quota: QuotasDep,
    settings: SettingsDep,
    days: Annotated[int, Query(ge=1, le=366, description="days of ledger history, today included")] = 7,
) -> UsageOut:
    limits = admission.limits_of(user, settings)
    today = quotas.utc_day()
    snapshot = await quota.peek(user_id=user.id, limits=limits, day=today)
    async with maker() as session:
        rows = await jobs_repo.ledger(
            session=session, user_id=user.id, since=today - timedelta(days=days - 1)
        )
        files, stored = await files_repo.storage_used(session=session, user_id=user.id)
    used = sum(r.input_tokens + r.output_tokens for r in rows if r.day == today)
    charged = max(used, snapshot.tokens_charged or 0)
    return UsageOut(
        user=user.name,
        limits=QuotaOut(**vars(limits)),
        requests=RequestWindow(
            limit=limits.requests_per_minute,
            used=snapshot.rate.used,
            remaining=snapshot.rate.remaining,
            window_s=quotas.WINDOW_MS // 1000,
            reset_s=snapshot.rate.reset_s,
        ),
        tokens=TokenWindow(
            limit=limits.tokens_per_day,
            used=used,
            reserved=charged - used,
            remaining=max(0, limits.tokens_per_day - charged),
            resets_at=quotas.next_midnight(snapshot.now_ms),
        ),
        concurrent_jobs=ConcurrencyWindow(
            limit=limits.max_concurrent_jobs,
            active=snapshot.active_jobs,
            remaining=max(0, limits.max_concurrent_jobs - snapshot.active_jobs),
        ),
        storage=StorageWindow(
            limit_bytes=limits.max_storage_bytes, used_bytes=stored, limit_files=limits.max_files, files=files
        ),
        days=[
            DayUsage(
                day=r.day,
                input_tokens=r.input_tokens,
                output_tokens=r.output_tokens,
                total_tokens=r.input_tokens + r.output_tokens,
                jobs=r.jobs,
            )
            for r in rows
        ],
    )
