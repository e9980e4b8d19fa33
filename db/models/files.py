from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Index, LargeBinary, String, func, text
from sqlalchemy.orm import Mapped, deferred, mapped_column

from db.base import Base
from db.ids import new_id


class File(Base):
    """Uploaded media or batch input; content lives in PostgreSQL (files issue)."""

    __tablename__ = "files"
    __table_args__ = (
        Index("ix_files_user_created", "user_id", "created_at", "id"),
        Index("ix_files_expires", "expires_at", postgresql_where=text("expires_at IS NOT NULL")),
    )
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=partial(new_id, "file"))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    purpose: Mapped[str] = mapped_column(String(16))
    filename: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(100))
    size: Mapped[int] = mapped_column("bytes", BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    content: Mapped[bytes] = deferred(mapped_column(LargeBinary))
    # What sniffing the bytes found: kind, format, size, pixels or duration.
    media: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    expires_at: Mapped[datetime | None]  # then gone: 404 at once, deleted by the reconciler
