"""`POST /v1/completions`: the OpenAI completions shape over ordinary jobs (core/openai_completions.py).

Each prompt queues a job like `POST /v1/jobs` does (admission, quotas, batching, metrics); a list
of prompts queues one each, all or none. The request then waits for them; `stream: true` sends
`text_completion` chunks as the worker generates (the jobs' events, api/streaming.py), then
`data: [DONE]`. The jobs' ids are in `X-Gemmaq-Job-Id`, comma-separated, in prompt order.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from sse_starlette import ServerSentEvent

from api.deps import FlowDep
from api.errors import job_error_response
from api.flow import COMPLETION_ANSWERS, INTERACTIVE_PRIORITY
from api.streaming import Event, merged
from core import openai_completions
from core.openai_completions import CompletionRequest
from core.schemas import JobOut

router = APIRouter(tags=["openai"])


@router.post(
    "/completions",
    responses=COMPLETION_ANSWERS,
    summary="Completion (OpenAI-compatible): the prompt continued, without a chat template",
)
async def completions(body: CompletionRequest, flow: FlowDep) -> Response:
    specs = openai_completions.to_jobs(body, priority=INTERACTIVE_PRIORITY)
    with flow.submitting(stream=body.stream, jobs=len(specs)) as hold:  # each job followed on its own
        jobs = await flow.submit_all(specs)
    headers = {"X-Gemmaq-Job-Id": ",".join(job.id for job in jobs)}
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return flow.stream(
            hold,
            lambda follow: _chunks(jobs, merged([follow(job) for job in jobs]), include_usage),
            headers=headers,
        )
    with hold:
        ended = await asyncio.gather(*(flow.wait(job.id) for job in jobs))
    unsuccessful = next((job for job in ended if job.status != "succeeded"), None)
    if unsuccessful is None:
        return JSONResponse(openai_completions.completion(ended), headers=headers)
    return job_error_response(unsuccessful, headers)


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
