"""Webhook deliveries: made for ended jobs and attempted by the dispatcher (sync, in the
reconciler process: workers/webhooks.py); listed and configured by the API (async)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, func, select, text, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from core.schemas import BATCH_ENDED
from core.webhooks import EVENT_OF_BATCH_STATUS, job_event
from db.ids import new_id
from db.models import User, WebhookDelivery
from db.repo import pages
from db.repo.jobs import TERMINAL

MAX_PAGE = 100

_ENDED = text("""
SELECT id, user_id, status, webhook_url, finished_at, metadata->>'response_id', result->>'finish_reason'
FROM jobs
WHERE webhook_url IS NOT NULL AND finished_at >= :since AND status = ANY(:terminal)
  AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.job_id = jobs.id)
ORDER BY finished_at LIMIT :limit
""")


def create_for_ended(
    *, session: Session, since: datetime, max_pending: int, limit: int = 500
) -> tuple[int, datetime | None]:
    """A pending delivery for each job or batch with a webhook that ended since `since` and has
    none yet — failed at once, with why, past the owner's `max_pending` pending deliveries.
    Returns how many were made and the latest end seen."""
    jobs = session.execute(_ENDED, {"since": since, "terminal": TERMINAL, "limit": limit}).all()
    batches = session.execute(
        _BATCHES_ENDED, {"since": since, "limit": limit, "batch_ended": sorted(BATCH_ENDED)}
    ).all()
    values = [
        {"job_id": job_id, "user_id": user_id, "event": job_event(status, response_id, reason), "url": url}
        for job_id, user_id, status, url, _, response_id, reason in jobs
    ] + [
        {"batch_id": batch_id, "user_id": user_id, "event": EVENT_OF_BATCH_STATUS[status], "url": url}
        for batch_id, user_id, status, url, _ in batches
    ]
    if not values:
        return 0, None
    pending = dict(
        session.execute(
            select(WebhookDelivery.user_id, func.count())
            .where(
                WebhookDelivery.status == "pending",
                WebhookDelivery.user_id.in_({v["user_id"] for v in values}),
            )
            .group_by(WebhookDelivery.user_id)
        ).all()
    )
    rows = []
    for v in values:
        held = pending[v["user_id"]] = pending.get(v["user_id"], 0) + 1
        fresh: dict[str, Any] = {"status": "pending", "attempts": 0, "history": []}
        if held > max_pending:  # recorded, not attempted: the user's receiver is far behind
            dropped = f"dropped: more than {max_pending} of your deliveries are pending"
            fresh = {"status": "failed", "attempts": 0, "history": [{"at": datetime.now(UTC).isoformat(),
                     "status_code": None, "error": dropped, "ms": 0}]}  # fmt: skip
        rows.append({"id": new_id("msg"), "job_id": None, "batch_id": None} | v | fresh)
    session.execute(pg_insert(WebhookDelivery).values(rows).on_conflict_do_nothing())
    return len(rows), max(row[4] for row in [*jobs, *batches])


_BATCHES_ENDED = text("""
SELECT id, user_id, status, webhook_url, ended FROM (
  SELECT *, coalesce(completed_at, cancelled_at, expired_at, failed_at) AS ended FROM batches
  WHERE webhook_url IS NOT NULL AND status = ANY(:batch_ended)
) b
WHERE ended >= :since
  AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.batch_id = b.id)
ORDER BY ended LIMIT :limit
""")


_DUE = text("""
SELECT id FROM (
  SELECT id, user_id, next_attempt_at,
         row_number() OVER (PARTITION BY user_id ORDER BY next_attempt_at) AS turn
  FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_at <= now()
) due
LEFT JOIN unnest(CAST(:busy_users AS text[]), CAST(:busy_counts AS int[])) AS busy(user_id, n) USING (user_id)
WHERE turn <= :per_user - coalesce(busy.n, 0) ORDER BY turn, next_attempt_at LIMIT :limit
""")


def claim_due(
    *, session: Session, limit: int, per_user: int, lease_s: float, busy: dict[str, int] | None = None
) -> list[WebhookDelivery]:
    """Pending deliveries due now — at most `per_user` of each user's, less the user's attempts
    still in flight (`busy`), round the users first, so one user's backlog or slow receiver never
    holds up another's — pushed `lease_s` ahead so no other dispatcher takes them while they are
    attempted (if this one dies, they are due again then)."""
    busy = busy or {}
    params = {"per_user": per_user, "limit": limit, "busy_users": list(busy), "busy_counts": [*busy.values()]}
    ids = list(session.execute(_DUE, params).scalars())
    if not ids:
        return []
    locked = (
        select(WebhookDelivery)
        .where(WebhookDelivery.id.in_(ids), WebhookDelivery.status == "pending")
        .order_by(WebhookDelivery.next_attempt_at)
        .with_for_update(skip_locked=True)
    )
    deliveries = list(session.execute(locked).scalars())
    for d in deliveries:
        d.next_attempt_at = datetime.now(d.next_attempt_at.tzinfo) + timedelta(seconds=lease_s)
    return deliveries


def secret_of(*, session: Session, user_id: str, new: str) -> str:
    """The user's signing secret, made (`new`) if they have none yet."""
    stmt = (
        update(User)
        .where(User.id == user_id)
        .values(webhook_secret=func.coalesce(User.webhook_secret, new))
        .returning(User.webhook_secret)
    )
    return str(session.execute(stmt).scalar_one())


def record_attempt(
    *,
    session: Session,
    delivery_id: str,
    payload: str,
    attempt: dict[str, Any],
    delivered: bool,
    retry_in_s: float | None,
) -> None:
    """One attempt's outcome: delivered, failed for good (`retry_in_s` None), or due again."""
    values: dict[str, Any] = {
        "attempts": WebhookDelivery.attempts + 1,
        "payload": payload,
        "history": WebhookDelivery.history.op("||")(bindparam("attempt", [attempt], type_=JSONB)),
    }
    if delivered:
        values |= {"status": "delivered", "delivered_at": func.now()}
    elif retry_in_s is None:
        values |= {"status": "failed"}
    else:
        values |= {"next_attempt_at": func.now() + timedelta(seconds=retry_in_s)}
    session.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id).values(**values))


# ---- the API's side ------------------------------------------------------------------------


async def list_deliveries(
    *,
    session: AsyncSession,
    user_id: str,
    job_id: str | None,
    batch_id: str | None,
    after: WebhookDelivery | None,
    limit: int,
) -> tuple[list[WebhookDelivery], bool]:
    stmt = select(WebhookDelivery).where(WebhookDelivery.user_id == user_id)
    if job_id is not None:
        stmt = stmt.where(WebhookDelivery.job_id == job_id)
    if batch_id is not None:
        stmt = stmt.where(WebhookDelivery.batch_id == batch_id)
    return await pages.page(session, stmt, WebhookDelivery.created_at, WebhookDelivery.id, after, limit)


async def get_delivery(*, session: AsyncSession, user_id: str, delivery_id: str) -> WebhookDelivery | None:
    stmt = select(WebhookDelivery).where(
        WebhookDelivery.id == delivery_id, WebhookDelivery.user_id == user_id
    )
    return (await session.execute(stmt)).scalar_one_or_none()


async def settings_of(*, session: AsyncSession, user_id: str, new_secret: str) -> tuple[str | None, str]:
    """The user's default webhook URL and signing secret (made now if they have none)."""
    stmt = (
        update(User)
        .where(User.id == user_id)
        .values(webhook_secret=func.coalesce(User.webhook_secret, new_secret))
        .returning(User.webhook_url, User.webhook_secret)
    )
    url, secret = (await session.execute(stmt)).one()
    return url, str(secret)


async def default_url(*, session: AsyncSession, user_id: str) -> str | None:
    """The user's default webhook URL as it is now (the API's cached users may be older)."""
    url: str | None = (await session.execute(select(User.webhook_url).where(User.id == user_id))).scalar()
    return url


async def set_default_url(*, session: AsyncSession, user_id: str, url: str | None) -> None:
    await session.execute(update(User).where(User.id == user_id).values(webhook_url=url))
