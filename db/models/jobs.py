from __future__ import annotations

from datetime import date, datetime
from functools import partial
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from core.schemas import JOB_STATUSES
from db.base import Base
from db.ids import new_id


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(f"status IN {JOB_STATUSES!r}", name="status"),
        UniqueConstraint("user_id", "idempotency_key", name="uq_jobs_user_idempotency_key"),
        Index("ix_jobs_user_created", "user_id", "created_at", "id"),
        Index("ix_jobs_queued", "status", "created_at", postgresql_where="status = 'queued'"),
        Index("ix_jobs_running", "status", postgresql_where="status = 'running'"),
        Index("ix_jobs_finished", "finished_at", postgresql_where="finished_at IS NOT NULL"),
        # The webhook dispatcher's scan (db/repo/webhooks.py): only jobs that have a webhook.
        Index("ix_jobs_webhook_finished", "finished_at", postgresql_where="webhook_url IS NOT NULL"),
        Index("ix_jobs_batch_line", "batch_id", "batch_line", postgresql_where="batch_id IS NOT NULL"),
    )
    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=partial(new_id, "job"))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    variant: Mapped[str] = mapped_column(String(100))
    task: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    priority: Mapped[int] = mapped_column(SmallInteger, default=5)
    # Its priority among all users' jobs: `priority` capped by the owner's max_priority at
    # submission (core/scheduling.py); None on rows from before (then `priority`).
    shared_priority: Mapped[int | None] = mapped_column(SmallInteger)
    input: Mapped[dict[str, Any]]
    params: Mapped[dict[str, Any]]
    result: Mapped[dict[str, Any] | None]
    error: Mapped[dict[str, Any] | None]
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    webhook_url: Mapped[str | None] = mapped_column(String(2000))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Quota: the UTC day the job's tokens count against, and what admission reserved.
    charged_on: Mapped[date] = mapped_column(server_default=text("(now() AT TIME ZONE 'utc')::date"))
    reserved_tokens: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    worker: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    expires_at: Mapped[datetime | None]
    # A batch's line (its number in the input file, from 0), when the job is one.
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    batch_line: Mapped[int | None] = mapped_column(Integer)


class JobMetric(Base):
    """One row per job attempt."""

    __tablename__ = "job_metrics"
    __table_args__ = (UniqueConstraint("job_id", "attempt", name="uq_job_metrics_job_attempt"),)
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    queue_ms: Mapped[float | None] = mapped_column(Float)
    load_ms: Mapped[float | None] = mapped_column(Float)
    time_to_first_token_ms: Mapped[float | None] = mapped_column(Float)
    inference_ms: Mapped[float | None] = mapped_column(Float)
    total_ms: Mapped[float | None] = mapped_column(Float)
    input_tokens: Mapped[int | None] = mapped_column(Integer)
    output_tokens: Mapped[int | None] = mapped_column(Integer)
    tokens_per_second: Mapped[float | None] = mapped_column(Float)
    batch_size: Mapped[int | None] = mapped_column(Integer)
    images: Mapped[int | None] = mapped_column(Integer)
    audio_clips: Mapped[int | None] = mapped_column(Integer)
    audio_seconds: Mapped[float | None] = mapped_column(Float)
    preprocess_ms: Mapped[float | None] = mapped_column(Float)
    media_bytes: Mapped[int | None] = mapped_column(BigInteger)  # decoded on the worker
    peak_memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # Constrained decoding: compiling the job's grammar (0 when cached) and masking, per step.
    grammar_compile_ms: Mapped[float | None] = mapped_column(Float)
    grammar_mask_ms: Mapped[float | None] = mapped_column(Float)
    worker: Mapped[str | None] = mapped_column(String(200))
    device: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class UsageLedger(Base):
    """Tokens used per user and UTC day: the record of truth for quotas and `/v1/usage`.

    Written in the same transaction as the conditional update that ends a job, so a job
    counts exactly once whatever number of times its message is delivered.
    """

    __tablename__ = "usage_ledger"
    __table_args__ = (PrimaryKeyConstraint("user_id", "day"),)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    day: Mapped[date]
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    jobs: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())
