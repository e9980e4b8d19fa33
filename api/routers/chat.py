"""`POST /v1/chat/completions`: the OpenAI shape over an ordinary job (core/openai_chat.py).

The request queues a job like `POST /v1/jobs` does (admission, quotas, batching, metrics), then
waits for it; `stream: true` sends `chat.completion.chunk`s as the worker generates (the job's
events, api/streaming.py), then `data: [DONE]`. The job's id is in `X-Gemmaq-Job-Id`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from sse_starlette import ServerSentEvent

from api.deps import FlowDep
from api.errors import job_error_response
from api.flow import COMPLETION_ANSWERS, INTERACTIVE_PRIORITY
from core import openai_chat
from core.openai_chat import ChatRequest
from core.schemas import JobOut

router = APIRouter(tags=["openai"])


@router.post(
    "/chat/completions",
    responses=COMPLETION_ANSWERS,
    summary="Chat completion (OpenAI-compatible)",
)
async def chat_completions(body: ChatRequest, flow: FlowDep) -> Response:
    spec = openai_chat.to_job(body, priority=INTERACTIVE_PRIORITY, metadata={"api": "chat.completions"})
    with flow.submitting(stream=body.stream) as hold:
        job = await flow.submit(spec)
    headers = {"X-Gemmaq-Job-Id": job.id}
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        # A reply that must be a tool call streams as one: no content deltas, then its calls.
        calls_only = spec.params.tool_choice not in (None, "none", "auto")
        return flow.stream(
            hold,
            lambda follow: _chunks(job, follow(job), include_usage, calls_only=calls_only),
            headers=headers,
        )
    with hold:
        job = await flow.wait(job.id)
    if job.status == "succeeded":
        return JSONResponse(openai_chat.completion(job), headers=headers)
    return job_error_response(job, headers)


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
