"""`POST /v1/completions`: the OpenAI completions shape over ordinary jobs (core/openai_completions.py).

Each prompt queues a job like `POST /v1/jobs` does (admission, quotas, batching, metrics); a list
of prompts queues one each, all or none. The request then waits for them; `stream: true` sends
`text_completion` chunks as the worker generates (the jobs' events, api/streaming.py), then
`data: [DONE]`. The jobs' ids are in `X-Gemmaq-Job-Id`, comma-separated, in prompt order.
"""

from __future__ import annotations

import asyncio
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
from api.routers.chat import INTERACTIVE_PRIORITY, PING_S
from api.streaming import Event, follow, merged
from api.submission import SubmitterDep, read_job
from core import openai_completions
from core.openai_completions import CompletionRequest
from core.schemas import JobOut

router = APIRouter(tags=["openai"])


@router.post(
    "/completions",
    responses={
        **responses(401, 403, 409, 413, 415, 422, 429, 502, 503, 504),
        200: {"content": {"text/event-stream": {}}, "description": "the completion, or its chunks streamed"},
    },
    summary="Completion (OpenAI-compatible): the prompt continued, without a chat template",
)
async def completions(
    request: Request, body: CompletionRequest, submitter: SubmitterDep, done: DoneDep, holds: HoldsDep
) -> Response:
    specs = openai_completions.to_jobs(body, priority=INTERACTIVE_PRIORITY)
    # A place under the caller's cap first (429 past it), so a refused request queues nothing.
    hold = holds.take("stream" if body.stream else "wait", submitter.user.id)
    try:
        jobs = await submitter.submit_all(specs)
    except BaseException:
        hold.release()
        raise
    headers = {"X-Gemmaq-Job-Id": ",".join(job.id for job in jobs)}
    if body.stream:
        watch = KeyWatch(request)

        def reader(job_id: str) -> Any:
            async def read() -> JobOut:
                await watch.check()
                return await read_job(submitter.autocommit, submitter.user.id, job_id)

            return read

        streams = [follow(submitter.redis, submitter.settings, job, reader(job.id), "0-0") for job in jobs]
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        chunks = guarded(_chunks(jobs, merged(streams), include_usage), hold, watch)
        return EventSourceResponse(chunks, ping=PING_S, headers=headers)
    with hold:
        ended = await asyncio.gather(
            *(
                done.wait_for(
                    job.id,
                    functools.partial(read_job, submitter.autocommit, submitter.user.id, job.id),
                    submitter.settings.chat_wait_s,
                )
                for job in jobs
            )
        )
    unsuccessful = next((job for job in ended if job.status != "succeeded"), None)
    if unsuccessful is None:
        return JSONResponse(openai_completions.completion(ended), headers=headers)
    response = job_error_response(unsuccessful)
    response.headers.update(headers)
    return response


async def _chunks(
    jobs: list[JobOut], events: AsyncIterator[tuple[int, Event]], include_usage: bool
) -> AsyncIterator[ServerSentEvent]:
    def frame(data: dict[str, Any]) -> ServerSentEvent:
        return ServerSentEvent(data=json.dumps(data))

    first, ended = jobs[0], list(jobs)
    async for index, event in events:
        if event.event == "delta":
            yield frame(openai_completions.chunk(first, index, event.data["text"]))
        elif event.event == "done":
            final = ended[index] = JobOut.model_validate(event.data)
            if final.status != "succeeded":
                yield frame(json.loads(bytes(job_error_response(final).body)))
                break
            reason = openai_completions.finish_reason(final)
            yield frame(openai_completions.chunk(first, index, "", reason))
    else:
        if include_usage:
            yield frame(openai_completions.usage_chunk(first, ended))
    yield ServerSentEvent(data="[DONE]")
