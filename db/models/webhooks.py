from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import ForeignKey, Index, Integer, String, Text, UniqueConstraint, func, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from db.base import Base
from db.ids import new_id


class WebhookDelivery(Base):
    """One event for one webhook target, with every attempt to deliver it (core/webhooks.py).
    Its id is the `webhook-id` the receiver sees on every attempt."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("job_id", "event", name="uq_webhook_deliveries_job_event"),
        UniqueConstraint("batch_id", "event", name="uq_webhook_deliveries_batch_event"),
        Index("ix_webhook_deliveries_user_created", "user_id", "created_at", "id"),
        Index("ix_webhook_deliveries_due", "next_attempt_at", postgresql_where=text("status = 'pending'")),
    )
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=partial(new_id, "msg"))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    event: Mapped[str] = mapped_column(String(40))
    url: Mapped[str] = mapped_column(String(2000))
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(server_default=func.now())
    payload: Mapped[str | None] = mapped_column(Text)  # the body, fixed at the first attempt
    # [{"at", "status_code", "error", "ms"}] for each attempt, oldest first
    history: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, default=list)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    delivered_at: Mapped[datetime | None]
