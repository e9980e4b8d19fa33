"""The OpenAI Batch API: a JSONL file of chat completion requests in, an output file and an error
file out. The batch runner (api/batches.py) submits the lines as jobs and writes the files."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from api.deps import SessionMakerDep, UserDep
from api.errors import responses
from core.errors import NotFound, ValidationFailed
from db.models import Batch
from db.repo import batches as batches_repo
from db.repo import files as files_repo

router = APIRouter(tags=["batches"])

WINDOWS = {"24h": timedelta(hours=24)}


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    input_file_id: str = Field(max_length=64)
    endpoint: Literal["/v1/chat/completions"]
    completion_window: Literal["24h"] = "24h"
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = (
        Field(None, max_length=16)
    )


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
    status: Literal[
        "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
    ]
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


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchOut]
    first_id: str | None
    last_id: str | None
    has_more: bool


def _epoch(at: datetime | None) -> int | None:
    return int(at.timestamp()) if at is not None else None


def batch_out(batch: Batch, counts: dict[str, int]) -> BatchOut:
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


async def _out(maker: SessionMakerDep, batch: Batch) -> BatchOut:
    async with maker() as session:
        counts = await batches_repo.counts(session=session, batch_ids=[batch.id])
    return batch_out(batch, counts[batch.id])


@router.post("/batches", responses=responses(401, 404, 422), summary="Create a batch from a JSONL file")
async def create_batch(body: BatchCreate, user: UserDep, maker: SessionMakerDep) -> BatchOut:
    async with maker() as session, session.begin():
        file = await files_repo.get_file(session=session, user_id=user.id, file_id=body.input_file_id)
        if file is None:
            raise NotFound(f"no file {body.input_file_id!r}")
        if file.purpose != "batch":
            raise ValidationFailed(
                "input_file_id: upload the file with purpose=batch", {"purpose": file.purpose}
            )
        batch = await batches_repo.create_batch(
            session=session, user_id=user.id, input_file_id=file.id, endpoint=body.endpoint,
            completion_window=body.completion_window, metadata=body.metadata or {},
            total=int((file.media or {}).get("lines", 0)),
            expires_at=datetime.now(UTC) + WINDOWS[body.completion_window],
        )  # fmt: skip
    return await _out(maker, batch)


@router.get("/batches/{batch_id}", responses=responses(401, 404), summary="A batch")
async def get_batch(batch_id: str, user: UserDep, maker: SessionMakerDep) -> BatchOut:
    async with maker() as session:
        batch = await batches_repo.get_batch(session=session, user_id=user.id, batch_id=batch_id)
    if batch is None:
        raise NotFound(f"no batch {batch_id!r}")
    return await _out(maker, batch)


@router.get("/batches", responses=responses(401, 404, 422), summary="Your batches, newest first")
async def list_batches(
    user: UserDep,
    maker: SessionMakerDep,
    after: Annotated[str | None, Query(max_length=64, description="a batch id: the page after it")] = None,
    limit: Annotated[int, Query(ge=1, le=batches_repo.MAX_PAGE)] = 20,
) -> BatchList:
    async with maker() as session:
        anchor = None
        if after is not None:
            anchor = await batches_repo.get_batch(session=session, user_id=user.id, batch_id=after)
            if anchor is None:
                raise NotFound(f"no batch {after!r}")
        rows, more = await batches_repo.list_batches(
            session=session, user_id=user.id, after=anchor, limit=limit
        )
        counts = await batches_repo.counts(session=session, batch_ids=[b.id for b in rows])
    data = [batch_out(b, counts[b.id]) for b in rows]
    return BatchList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=more,
    )


@router.post("/batches/{batch_id}/cancel", responses=responses(401, 404), summary="Cancel a batch")
async def cancel_batch(batch_id: str, user: UserDep, maker: SessionMakerDep) -> BatchOut:
    """A batch in progress turns `cancelling`: its queued lines are cancelled, its running ones
    stopped; then it is `cancelled`, with the lines that finished in its output file. A batch
    that has ended is returned as it is."""
    async with maker() as session, session.begin():
        batch = await batches_repo.get_batch(session=session, user_id=user.id, batch_id=batch_id, lock=True)
        if batch is None:
            raise NotFound(f"no batch {batch_id!r}")
        if batch.status in ("validating", "in_progress"):
            batch.status, batch.ending, batch.cancelling_at = "cancelling", "cancelled", datetime.now(UTC)
    return await _out(maker, batch)
