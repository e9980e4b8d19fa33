"""The OpenAI Batch request and object, as `/v1/batches` takes and returns it and as `batch.*`
webhooks carry it; the endpoints a batch's lines may target."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from core import openai_chat, openai_completions, openai_responses
from core.errors import ValidationFailed
from core.openai_chat import ChatRequest
from core.openai_completions import CompletionRequest
from core.openai_responses import ResponseRequest
from core.schemas import BatchStatus, JobCreate, JobOut, SafeStr


class BatchRow(Protocol):
    """What `batch_out` reads of a batch (db.models.Batch)."""

    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None
    error_file_id: str | None
    created_at: datetime
    in_progress_at: datetime | None
    expires_at: datetime
    finalizing_at: datetime | None
    completed_at: datetime | None
    failed_at: datetime | None
    expired_at: datetime | None
    cancelling_at: datetime | None
    cancelled_at: datetime | None
    total: int
    metadata_: dict[str, Any]


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchOut(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: dict[str, Any] | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, str] | None


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


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchOut]
    first_id: str | None
    last_id: str | None
    has_more: bool


def _epoch(at: datetime | None) -> int | None:
    return int(at.timestamp()) if at is not None else None


def batch_out(batch: BatchRow, counts: dict[str, int]) -> BatchOut:
    """`request_counts`: completed = lines whose job succeeded; failed = lines whose job failed or
    expired, and lines that could not become a job; cancelled lines count in neither."""
    failed = counts.get("failed", 0) + counts.get("expired", 0) + counts.get("line_errors", 0)
    return BatchOut(
        id=batch.id,
        endpoint=batch.endpoint,
        input_file_id=batch.input_file_id,
        completion_window=batch.completion_window,
        status=batch.status,
        output_file_id=batch.output_file_id,
        error_file_id=batch.error_file_id,
        created_at=int(batch.created_at.timestamp()),
        in_progress_at=_epoch(batch.in_progress_at),
        expires_at=int(batch.expires_at.timestamp()),
        finalizing_at=_epoch(batch.finalizing_at),
        completed_at=_epoch(batch.completed_at),
        failed_at=_epoch(batch.failed_at),
        expired_at=_epoch(batch.expired_at),
        cancelling_at=_epoch(batch.cancelling_at),
        cancelled_at=_epoch(batch.cancelled_at),
        request_counts=RequestCounts(total=batch.total, completed=counts.get("succeeded", 0), failed=failed),
        metadata=batch.metadata_ or None,
    )


BATCH_PRIORITY = 2  # a batch line's job: below interactive jobs (5 by default)


@dataclass(frozen=True)
class LineEndpoint:
    """What a batch line's `url` may be: how its body becomes a job, how the succeeded job is
    answered in the output file."""

    to_job: Callable[[Any, dict[str, str]], JobCreate]  # the body (JSON), the job's metadata
    answer: Callable[[JobOut], dict[str, Any]]


def _chat_line(body: Any, metadata: dict[str, str]) -> JobCreate:
    request = ChatRequest.model_validate(body)
    if request.stream:
        raise ValidationFailed("stream: a batch line is not streamed")
    return openai_chat.to_job(request, priority=BATCH_PRIORITY, metadata=metadata)


def _completion_line(body: Any, metadata: dict[str, str]) -> JobCreate:
    request = CompletionRequest.model_validate(body)
    if request.stream:
        raise ValidationFailed("stream: a batch line is not streamed")
    if len(request.prompts()) != 1:
        raise ValidationFailed("prompt: a batch line takes one prompt (one line per prompt)")
    return openai_completions.to_jobs(request, priority=BATCH_PRIORITY, metadata=metadata)[0]


def _response_line(body: Any, metadata: dict[str, str]) -> JobCreate:
    request = ResponseRequest.model_validate(body)
    if request.stream or request.background:
        raise ValidationFailed("stream, background: a batch line is neither streamed nor in the background")
    if request.previous_response_id is not None:
        raise ValidationFailed("previous_response_id: a batch line does not continue a stored response")
    return openai_responses.to_job(request, [], priority=BATCH_PRIORITY, metadata=metadata)


def _response_body(job: JobOut) -> dict[str, Any]:
    return openai_responses.response(
        "resp_" + job.id.removeprefix("job_"), job, instructions=None, max_output_tokens=None,
        previous_response_id=None, background=False, store=False, metadata={}, created_at=job.created_at,
    )  # fmt: skip


LINE_ENDPOINTS = {
    "/v1/chat/completions": LineEndpoint(_chat_line, openai_chat.completion),
    "/v1/completions": LineEndpoint(_completion_line, lambda job: openai_completions.completion([job])),
    "/v1/responses": LineEndpoint(_response_line, _response_body),
}
