"""The OpenAI Batch API: a JSONL file of chat completion requests in, an output file and an error
file out. The batch runner (api/batch_runner.py) submits the lines as jobs and writes the files."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query
from starlette.concurrency import run_in_threadpool

from api.deps import SessionMakerDep, SettingsDep, UserDep
from api.errors import responses
from core.errors import NotFound, ValidationFailed
from core.openai_batch import BatchCreate, BatchList, BatchOut, batch_out
from core.webhooks import check_target
from db.models import Batch
from db.repo import batches as batches_repo
from db.repo import files as files_repo
from db.repo import webhooks as webhooks_repo

router = APIRouter(tags=["batches"])

WINDOWS = {"24h": timedelta(hours=24)}


async def _out(maker: SessionMakerDep, batch: Batch) -> BatchOut:
    async with maker() as session:
        counts = await batches_repo.counts(session=session, batch_ids=[batch.id])
    return batch_out(batch, counts[batch.id])


@router.post("/batches", responses=responses(401, 404, 422), summary="Create a batch from a JSONL file")
async def create_batch(
    body: BatchCreate, user: UserDep, maker: SessionMakerDep, settings: SettingsDep
) -> BatchOut:
    if body.webhook_url is not None:
        await run_in_threadpool(check_target, body.webhook_url, settings)
    async with maker() as session, session.begin():
        file = await files_repo.get_file(session=session, user_id=user.id, file_id=body.input_file_id)
        if file is None:
            raise NotFound(f"no file {body.input_file_id!r}")
        if file.purpose != "batch":
            raise ValidationFailed(
                "input_file_id: upload the file with purpose=batch", {"purpose": file.purpose}
            )
        default = await webhooks_repo.default_url(session=session, user_id=user.id)
        batch = await batches_repo.create_batch(
            session=session, user_id=user.id, input_file_id=file.id, endpoint=body.endpoint,
            completion_window=body.completion_window, metadata=body.metadata or {},
            total=int((file.media or {}).get("lines", 0)),
            expires_at=datetime.now(UTC) + WINDOWS[body.completion_window],
            webhook_url=body.webhook_url or default,
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
