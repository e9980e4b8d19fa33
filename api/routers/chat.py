"""`POST /v1/chat/completions`: the OpenAI shape over an ordinary job (core/openai_chat.py).

The request queues a job like `POST /v1/jobs` does (admission, quotas, batching, metrics), then
waits for it; `stream: true` sends `chat.completion.chunk`s as the worker generates (the job's
events, api/streaming.py), then `data: [DONE]`. The job's id is in `X-Gemmaq-Job-Id`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.deps import DoneDep, HoldsDep
from api.errors import job_error_response, responses
from api.holds import KeyWatch, guarded
from api.streaming import follow
from api.submission import SubmitterDep, read_job
from core import openai_chat
from core.openai_chat import ChatRequest
from core.schemas import JobOut

router = APIRouter(tags=["openai"])

INTERACTIVE_PRIORITY = 5  # a chat completion's jobs: as a job submitted with the default priority
PING_S = 15


@router.post(
    "/chat/completions",
    responses={
        **responses(401, 403, 409, 413, 415, 422, 429, 502, 503, 504),
        200: {"content": {"text/event-stream": {}}, "description": "the completion, or its chunks streamed"},
    },
    summary="Chat completion (OpenAI-compatible)",
)
async def chat_completions(
    request: Request, body: ChatRequest, submitter: SubmitterDep, done: DoneDep, holds: HoldsDep
) -> Response:
    spec = openai_chat.to_job(body, priority=INTERACTIVE_PRIORITY, metadata={"api": "chat.completions"})
    # A place under the caller's cap first (429 past it), so a refused request queues nothing.
    hold = holds.take("stream" if body.stream else "wait", submitter.user.id)
    try:
        job = (await submitter.submit(spec)).job
    except BaseException:
        hold.release()
        raise
    headers = {"X-Gemmaq-Job-Id": job.id}
    if body.stream:
        watch = KeyWatch(request)

        async def read() -> JobOut:
            await watch.check()
            return await read_job(submitter.autocommit, submitter.user.id, job.id)

        include_usage = body.stream_options is not None and body.stream_options.include_usage
        follow_job = follow(submitter.redis, submitter.settings, job, read, "0-0")
        # A reply that must be a tool call streams as one: no content deltas, then its calls.
        calls_only = spec.params.tool_choice not in (None, "none", "auto")
        chunks = guarded(_chunks(job, follow_job, include_usage, calls_only=calls_only), hold, watch)
        return EventSourceResponse(chunks, ping=PING_S, headers=headers)
    with hold:
        job = await done.wait_for(
            job.id,
            functools.partial(read_job, submitter.autocommit, submitter.user.id, job.id),
            submitter.settings.chat_wait_s,
        )
    if job.status == "succeeded":
        return JSONResponse(openai_chat.completion(job), headers=headers)
    response = job_error_response(job)
    response.headers.update(headers)
    return response


async def _chunks(
    job: JobOut, events: AsyncIterator[Any], include_usage: bool, *, calls_only: bool = False
) -> AsyncIterator[ServerSentEvent]:
    def frame(data: dict[str, Any]) -> ServerSentEvent:
        return ServerSentEvent(data=json.dumps(data))

    yield frame(openai_chat.chunk(job, {"role": "assistant", "content": ""}))
    async for event in events:
        if event.event == "delta" and not calls_only:
            yield frame(openai_chat.chunk(job, {"content": event.data["text"]}))
        elif event.event == "done":
            final = JobOut.model_validate(event.data)
            if final.status != "succeeded":
                yield frame(json.loads(bytes(job_error_response(final).body)))
                break
            if calls := openai_chat.tool_calls(final):
                indexed = [{"index": i, **call} for i, call in enumerate(calls)]
                yield frame(openai_chat.chunk(final, {"tool_calls": indexed}))
            yield frame(openai_chat.chunk(final, {}, openai_chat.finish_reason(final)))
            if include_usage:
                yield frame(openai_chat.usage_chunk(final))
    yield ServerSentEvent(data="[DONE]")
