from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import ARRAY, BigInteger, ForeignKey, Integer, SmallInteger, String, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column, relationship

from db.base import Base
from db.ids import new_id


class User(Base):
    __tablename__ = "users"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=partial(new_id, "usr"))
    name: Mapped[str] = mapped_column(String(100), unique=True)
    is_admin: Mapped[bool] = mapped_column(default=False)
    # Webhooks: where a job without its own webhook_url reports (set when it is submitted), and
    # the secret deliveries are signed with (core/webhooks.py), made on first use.
    webhook_url: Mapped[str | None] = mapped_column(String(2000))
    webhook_secret: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())

    quota: Mapped[Quota | None] = relationship(back_populates="user", lazy="raise")


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=partial(new_id, "key"))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    # The key itself is shown once; only its SHA-256 and a visible prefix are kept.
    prefix: Mapped[str] = mapped_column(String(16))
    hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class Quota(Base):
    """Per-user limits; enforced at admission (quota issue)."""

    __tablename__ = "quotas"
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    requests_per_minute: Mapped[int] = mapped_column(Integer)
    tokens_per_day: Mapped[int] = mapped_column(BigInteger)
    max_concurrent_jobs: Mapped[int] = mapped_column(Integer)
    max_input_bytes: Mapped[int] = mapped_column(BigInteger)
    allowed_variants: Mapped[list[str] | None] = mapped_column(ARRAY(String(100)))
    max_storage_bytes: Mapped[int] = mapped_column(BigInteger)  # of the user's files, in all
    max_files: Mapped[int] = mapped_column(Integer)
    # The highest priority the user's jobs reach among other users' (None: the deployment's).
    max_priority: Mapped[int | None] = mapped_column(SmallInteger, default=None)
    # A whole moderation policy (core/moderation.py) in place of the deployment's; None: its.
    moderation_policy: Mapped[dict[str, Any] | None] = mapped_column(JSONB, default=None)
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())

    user: Mapped[User] = relationship(back_populates="quota", lazy="raise")
