"""The OpenAI Responses API over ordinary jobs (core/openai_responses.py), stored in PostgreSQL.

`POST /v1/responses` queues a job like `POST /v1/jobs` does (admission, quotas, batching,
metrics, webhooks). With `background: true` it answers at once (`queued`), and the response is
followed with `GET /v1/responses/{id}`; without, it waits, as chat completions do; `stream:
true` sends the Responses event stream (`response.created`, `response.output_text.delta`,
`response.completed`). A stored response (`store`, the default) survives API restarts, is its
owner's only (another user's id is a 404), and can be continued (`previous_response_id`),
cancelled and deleted. What it keeps counts in its owner's storage quota beside their files,
and it expires with the files' retention. The job's id is in `X-Gemmaq-Job-Id`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Path
from fastapi.responses import JSONResponse, Response
from sse_starlette import ServerSentEvent

from api import admission
from api.deps import FlowDep, SessionMakerDep, SettingsDep, UserDep
from api.errors import responses
from api.flow import INTERACTIVE_PRIORITY
from core import openai_responses, quotas
from core.errors import NotFound
from core.openai_responses import ResponseRequest
from core.schemas import TERMINAL_STATUSES, JobOut
from db.ids import new_id
from db.models import StoredResponse
from db.repo import files as files_repo
from db.repo import responses as responses_repo

router = APIRouter(tags=["openai"])

ResponseId = Annotated[str, Path(max_length=64)]
CANCEL_WAIT_S = 10.0  # a cancelled running response: how long the answer waits for its job to stop


@router.post(
    "/responses",
    responses={
        **responses(401, 403, 404, 409, 413, 415, 422, 429, 502, 503, 504),
        200: {"content": {"text/event-stream": {}}, "description": "the response, or its events streamed"},
    },
    summary="Create a response (OpenAI Responses API); background=true answers at once",
)
async def create_response(
    body: ResponseRequest, flow: FlowDep, maker: SessionMakerDep, settings: SettingsDep
) -> Response:
    user = flow.user
    context: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        previous = await _stored(maker, user.id, body.previous_response_id)
        job = await flow.read(previous.job_id)
        if job.status not in TERMINAL_STATUSES:
            raise NotFound(f"response {previous.id!r} has not finished; continue it once it has")
        context = openai_responses.continued(previous.context, previous.input_items, job)
    size = openai_responses.stored_bytes(body, context)
    if body.store:  # what it will keep must fit in the owner's storage, beside their files
        limits = admission.limits_of(user, settings)
        async with maker() as session, session.begin():
            files, used = await files_repo.storage_used(session=session, user_id=user.id, lock=True)
            quotas.check_storage(limits, files=files, used=used, adding=size, new_file=False)
    response_id = new_id("resp")
    tags = {"api": "responses", "response_id": response_id}
    spec = openai_responses.to_job(body, context, priority=INTERACTIVE_PRIORITY, metadata=tags)
    # In the background nothing is held open: the answer comes at once.
    holding = contextlib.nullcontext() if body.background else flow.submitting(stream=body.stream)
    with holding as hold:
        job = await flow.submit(spec)
        row = StoredResponse(
            id=response_id, user_id=user.id, job_id=job.id,
            previous_response_id=body.previous_response_id, instructions=body.instructions,
            input_items=body.items(), context=context, background=body.background,
            max_output_tokens=body.max_output_tokens, metadata_=body.metadata or {},
            bytes=size, expires_at=files_repo.expiry(settings.files_retention_s),
        )  # fmt: skip
        if body.store:
            async with maker() as session, session.begin():
                await responses_repo.add(session=session, row=row)
    headers = {"X-Gemmaq-Job-Id": job.id}
    if hold is None:
        return JSONResponse(openai_responses.response_of(row, job, store=body.store), headers=headers)
    if body.stream:
        return flow.stream(hold, lambda follow: _events(row, job, body.store, follow(job)), headers=headers)
    with hold:
        job = await flow.wait(job.id)
    return JSONResponse(openai_responses.response_of(row, job, store=body.store), headers=headers)


@router.get("/responses/{response_id}", responses=responses(401, 404), summary="Retrieve a stored response")
async def get_response(response_id: ResponseId, flow: FlowDep, maker: SessionMakerDep) -> dict[str, Any]:
    row = await _stored(maker, flow.user.id, response_id)
    job = await flow.read(row.job_id)
    return openai_responses.response_of(row, job, created_at=row.created_at)


@router.post(
    "/responses/{response_id}/cancel",
    responses=responses(401, 404),
    summary="Cancel a response: queued, it never runs; running, it stops at its next step",
)
async def cancel_response(response_id: ResponseId, flow: FlowDep, maker: SessionMakerDep) -> dict[str, Any]:
    row = await _stored(maker, flow.user.id, response_id)
    if not await flow.cancels.queued(flow.user.id, row.job_id):
        job = await flow.read(row.job_id)
        if job.status not in TERMINAL_STATUSES:
            await flow.cancels.running(row.job_id)
    job = await flow.wait(row.job_id, CANCEL_WAIT_S)
    return openai_responses.response_of(row, job, created_at=row.created_at)


@router.delete("/responses/{response_id}", responses=responses(401, 404), summary="Delete a stored response")
async def delete_response(response_id: ResponseId, user: UserDep, maker: SessionMakerDep) -> dict[str, Any]:
    async with maker() as session, session.begin():
        removed = await responses_repo.remove(session=session, user_id=user.id, response_id=response_id)
    if not removed:
        raise NotFound(f"no response {response_id!r}")
    return {"id": response_id, "object": "response", "deleted": True}


@router.get(
    "/responses/{response_id}/input_items", responses=responses(401, 404), summary="A response's input items"
)
async def input_items(response_id: ResponseId, user: UserDep, maker: SessionMakerDep) -> dict[str, Any]:
    row = await _stored(maker, user.id, response_id)
    data = [
        {
            "id": f"msg_{row.id.removeprefix('resp_')}_{i}",
            "type": "message",
            "status": "completed",
            "role": item["role"],
            "content": [{"type": "input_text", "text": item["content"]}]
            if isinstance(item["content"], str)
            else item["content"],
        }
        for i, item in enumerate(row.input_items)
    ]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": False,
    }


async def _stored(maker: SessionMakerDep, user_id: str, response_id: str) -> StoredResponse:
    async with maker() as session:
        row = await responses_repo.get(session=session, user_id=user_id, response_id=response_id)
    if row is None:
        raise NotFound(f"no response {response_id!r}")
    return row


async def _events(
    row: StoredResponse, job: JobOut, store: bool, events: AsyncIterator[Any]
) -> AsyncIterator[ServerSentEvent]:
    sequence = itertools.count(1)

    def frame(kind: str, data: dict[str, Any]) -> ServerSentEvent:
        body = {"type": kind, "sequence_number": next(sequence), **data}
        return ServerSentEvent(event=kind, data=json.dumps(body))

    yield frame("response.created", {"response": openai_responses.response_of(row, job, store=store)})
    item_id = openai_responses.message_id(row.id)
    async for event in events:
        if event.event == "delta":
            yield frame(
                "response.output_text.delta",
                {"item_id": item_id, "output_index": 0, "content_index": 0, "delta": event.data["text"]},
            )
        elif event.event == "done":
            final = JobOut.model_validate(event.data)
            body = openai_responses.response_of(row, final, store=store)
            kind = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(
                body["status"], "response.failed"
            )
            yield frame(kind, {"response": body})
            break
