"""The API's own request and response models, and how rows become them.

The job contract shared with the workers and the client (`JobCreate`, `JobOut`, the statuses, the
usage shapes) is core/schemas.py; the OpenAI-compatible shapes are in core/openai_*.py; the error
envelope is api/errors.py.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import RowMapping

from core.openai_chat import Strict
from core.schemas import MAX_TEXT_CHARS, JobOut, SafeStr
from db.models import File, WebhookDelivery
from db.repo import jobs as jobs_repo

# ---- jobs ------------------------------------------------------------------------------------


def job_out(row: RowMapping) -> JobOut:
    """A job as the API shows it, from a row the jobs repository read (db/repo/jobs.py)."""
    return JobOut.model_validate(jobs_repo.job_fields(row))


# ---- files -----------------------------------------------------------------------------------


class FileOut(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
    content_type: str
    sha256: str
    media: dict[str, Any] | None
    expires_at: int | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileOut]
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


def file_out(file: File) -> FileOut:
    return FileOut(
        id=file.id,
        bytes=file.size,
        created_at=int(file.created_at.timestamp()),
        filename=file.filename,
        purpose=file.purpose,
        content_type=file.content_type,
        sha256=file.sha256,
        media=file.media,
        expires_at=int(file.expires_at.timestamp()) if file.expires_at else None,
    )


# ---- batches ---------------------------------------------------------------------------------


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input_file_id: str = Field(max_length=64)
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/responses"]
    completion_window: Literal["24h"] = "24h"
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = (
        Field(None, max_length=16)
    )
    webhook_url: SafeStr | None = Field(
        None,
        max_length=2000,
        description="gemmaq: batch.completed|failed|cancelled go here (else your default)",
    )


# ---- models ----------------------------------------------------------------------------------


class WorkerState(BaseModel):
    """One worker's view of the variant: `warm` (resident), `cold` (served, loaded when a job
    comes), `loading`, or `unavailable` (with the reason)."""

    worker: str
    device: str
    state: Literal["loading", "warm", "cold", "unavailable"]
    reason: str | None = None
    last_used_at: float | None = Field(None, description="epoch seconds of its latest job on this worker")
    resident_mb: float | None = Field(None, description="memory it occupies while warm, as measured")
    memory_mb: float | None = Field(None, description="what the worker's memory budget counts for it")
    load_ms: float | None = Field(None, description="its latest load on this worker")


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str
    family: str
    size: str
    tasks: list[str]
    dtype: str
    quantization: str
    diagnostic: bool
    description: str
    max_new_tokens: int
    max_batch_size: int
    available: bool
    unavailable_reason: str | None
    workers: list[WorkerState]
    queue_depth: int | None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


# ---- moderations -----------------------------------------------------------------------------

MAX_MODERATION_INPUTS = 32


class TextInput(Strict):
    type: Literal["text"]
    text: SafeStr = Field(max_length=MAX_TEXT_CHARS)


class ModerationRequest(Strict):
    input: SafeStr | list[SafeStr] | list[TextInput] = Field(
        description=f"a text, up to {MAX_MODERATION_INPUTS} texts (a result each), or text parts (one result)"
    )
    model: SafeStr | None = Field(None, max_length=100, description="ignored: the policy answers")

    def texts(self) -> list[str]:
        if isinstance(self.input, str):
            return [self.input]
        if all(isinstance(item, TextInput) for item in self.input):
            return ["\n".join(item.text for item in self.input if isinstance(item, TextInput))]
        return [item for item in self.input if isinstance(item, str)]


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
