"""The API's own request and response models, and how rows become them.

The job contract shared with the workers and the client (`JobCreate`, `JobOut`, the statuses, the
usage shapes) is core/schemas.py; the error envelope is api/errors.py. Every shape that follows
OpenAI's API (chat, completions, responses, batches, files, audio, moderations, models) is in
core/openai_<route>.py, gemmaq's extensions to it included; its router only speaks HTTP.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field
from sqlalchemy import RowMapping

from core.schemas import JobOut, SafeStr
from db.models import Adapter, WebhookDelivery
from db.repo import jobs as jobs_repo

# ---- jobs ------------------------------------------------------------------------------------


def job_out(row: RowMapping) -> JobOut:
    """A job as the API shows it, from a row the jobs repository read (db/repo/jobs.py)."""
    return JobOut.model_validate(jobs_repo.job_fields(row))


# ---- LoRA adapters ---------------------------------------------------------------------------


class AdapterOut(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    name: str
    base: str = Field(description="the variant it adapts")
    rank: int
    alpha: float
    target_modules: list[str]
    bytes: int = Field(description="what it counts in its owner's storage quota")
    public: bool = Field(description="published to every tenant by an admin")
    owned: bool = Field(description="the caller owns it")
    created_at: int


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterOut]


class AdapterDeleted(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    deleted: bool


def adapter_out(a: Adapter, user_id: str) -> AdapterOut:
    return AdapterOut(
        id=a.id,
        name=a.name,
        base=a.base,
        rank=a.rank,
        alpha=a.alpha,
        target_modules=list(a.target_modules),
        bytes=a.size,
        public=a.public,
        owned=a.user_id == user_id,
        created_at=int(a.created_at.timestamp()),
    )


# ---- webhooks --------------------------------------------------------------------------------


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


# ---- metrics summary -------------------------------------------------------------------------


class JobCounts(BaseModel):
    total: int
    succeeded: int
    failed: int
    cancelled: int
    expired: int


class Spread(BaseModel):
    mean: float | None
    p95: float | None


class PeakMemory(BaseModel):
    mean: float | None
    max: float | None


class Filtered(BaseModel):
    input: int = Field(description="submissions refused CONTENT_FILTERED")
    output: int = Field(description="jobs whose output was withheld (RESPONSE_FILTERED)")


class Alert(BaseModel):
    metric: Literal["latency_p95_ms", "peak_memory_mb", "tokens_per_second", "success_rate"]
    severity: Literal["low", "medium", "high"]
    value: float
    threshold: float
    message: str


class Summary(BaseModel):
    """Over the jobs that ended in the window: the caller's own, or every user's for an admin."""

    scope: Literal["user", "all"]
    variant: str | None
    window_s: int
    jobs: JobCounts
    success_rate: float | None = Field(
        description="succeeded / (succeeded + failed + expired); cancelled jobs are left out"
    )
    latency_ms: Spread = Field(description="submission to end, succeeded jobs")
    time_to_first_token_ms: Spread
    tokens_per_second: float | None = Field(description="mean per-job decode rate, succeeded jobs")
    input_tokens: int
    output_tokens: int
    peak_memory_mb: PeakMemory = Field(description="device memory peaks of succeeded jobs")
    filtered: Filtered = Field(description="the content filter's refusals, counted by the hour")
    alerts: list[Alert]
