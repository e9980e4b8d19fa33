from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import ForeignKey, Integer, LargeBinary, PrimaryKeyConstraint, String, Text, func
from sqlalchemy.orm import Mapped, mapped_column

from db.base import Base
from db.ids import new_id


class FilePart(Base):
    """A batch file's bytes, in parts of whole lines (about 1 MiB each), so neither an upload
    nor a batch run ever holds a whole file in memory (files of purpose batch and batch_output)."""

    __tablename__ = "file_parts"
    __table_args__ = (PrimaryKeyConstraint("file_id", "seq", name="pk_file_parts"),)
    file_id: Mapped[str] = mapped_column(ForeignKey("files.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    lines: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Batch(Base):
    """An OpenAI Batch: the lines of its input file, each run as a job (jobs.batch_id)."""

    __tablename__ = "batches"
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=partial(new_id, "batch"))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    input_file_id: Mapped[str] = mapped_column(ForeignKey("files.id", ondelete="RESTRICT"))
    endpoint: Mapped[str] = mapped_column(String(100))
    completion_window: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="validating")
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    total: Mapped[int] = mapped_column(Integer, default=0)
    # How far the lines have been submitted: the next part, and the next line within it.
    next_part: Mapped[int] = mapped_column(Integer, default=0)
    next_line: Mapped[int] = mapped_column(Integer, default=0)
    submitted: Mapped[int] = mapped_column(Integer, default=0)  # lines handled (a job, or an error)
    webhook_url: Mapped[str | None] = mapped_column(String(2000))  # its own, or its owner's default
    ending: Mapped[str | None] = mapped_column(String(16))  # cancelled | expired, once it is ending so
    worked_at: Mapped[datetime | None]  # the runner's latest turn on it (turns go round)
    next_turn_at: Mapped[datetime | None]  # no turn before this (a quota refused, a turn failed)
    output_file_id: Mapped[str | None] = mapped_column(ForeignKey("files.id", ondelete="SET NULL"))
    error_file_id: Mapped[str | None] = mapped_column(ForeignKey("files.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    in_progress_at: Mapped[datetime | None]
    finalizing_at: Mapped[datetime | None]
    completed_at: Mapped[datetime | None]
    failed_at: Mapped[datetime | None]
    expired_at: Mapped[datetime | None]
    cancelling_at: Mapped[datetime | None]
    cancelled_at: Mapped[datetime | None]
    expires_at: Mapped[datetime]


class BatchLineError(Base):
    """A line that never became a job (not JSON, not a request this API serves, refused)."""

    __tablename__ = "batch_line_errors"
    __table_args__ = (PrimaryKeyConstraint("batch_id", "line", name="pk_batch_line_errors"),)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    line: Mapped[int] = mapped_column(Integer)
    custom_id: Mapped[str | None] = mapped_column(String(200))
    code: Mapped[str] = mapped_column(String(40))
    message: Mapped[str] = mapped_column(Text)
