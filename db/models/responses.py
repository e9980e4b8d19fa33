from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import BigInteger, Boolean, ForeignKey, Integer, String, Text, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from db.base import Base
from db.ids import new_id


class StoredResponse(Base):
    """An OpenAI Responses API response (`store`, the default): the request's own fields beside
    the job that generates it (jobs.id), so it is read back, continued and cancelled later, by
    its owner only, across API restarts."""

    __tablename__ = "responses"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=partial(new_id, "resp"))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    previous_response_id: Mapped[str | None] = mapped_column(String(40))
    instructions: Mapped[str | None] = mapped_column(Text)
    input_items: Mapped[list[Any]] = mapped_column(JSONB)  # this request's input, as given
    # The conversation before this input (earlier turns and their replies), as job messages.
    context: Mapped[list[Any]] = mapped_column(JSONB, default=list)
    background: Mapped[bool] = mapped_column(Boolean, default=False)
    max_output_tokens: Mapped[int | None] = mapped_column(Integer)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    # What it holds (its input, context, instructions and metadata, as JSON), counted in its
    # owner's storage quota beside their files; it expires with the files' retention.
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    expires_at: Mapped[datetime | None]
