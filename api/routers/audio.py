"""`POST /v1/audio/transcriptions` and `POST /v1/audio/translations`: OpenAI's audio shape
(multipart, as the SDK sends it; core/openai_audio.py) over an ordinary audio job.

The uploaded file becomes the job's audio (checked and stored as every job's media is: its
type sniffed, its length under the variant's cap), the request waits for the job as chat
completions do, and the text comes back in `response_format`. The job's id is in
`X-Gemmaq-Job-Id`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from api.deps import FlowDep
from api.errors import job_error_response, responses
from api.flow import INTERACTIVE_PRIORITY, JobFlow
from api.media_admission import read_capped
from core.openai_audio import Format, Task, answer_of, audio_job

router = APIRouter(tags=["openai"])

ANSWERS = {
    **responses(401, 403, 409, 413, 415, 422, 429, 502, 503, 504),
    200: {"content": {"application/json": {}, "text/plain": {}}, "description": "as response_format says"},
}

FileForm = Annotated[UploadFile, File(description="the audio: WAV, FLAC, MP3, OGG …")]
ModelForm = Annotated[str, Form(min_length=1, max_length=100, description="a gemmaq speech variant")]
LanguageForm = Annotated[str | None, Form(max_length=40, description="the speech's language, ISO-639-1")]
PromptForm = Annotated[str | None, Form(max_length=2000, description="an instruction for Gemma 3n")]
TemperatureForm = Annotated[float | None, Form(ge=0, le=1)]
FormatForm = Annotated[Format, Form()]


@router.post("/audio/transcriptions", responses=ANSWERS, summary="Transcribe speech (OpenAI-compatible)")
async def transcriptions(
    flow: FlowDep,
    file: FileForm,
    model: ModelForm,
    language: LanguageForm = None,
    prompt: PromptForm = None,
    temperature: TemperatureForm = None,
    response_format: FormatForm = "json",
    timestamp_granularities: Annotated[
        list[Literal["segment"]] | None, Form(alias="timestamp_granularities[]", description="segment only")
    ] = None,
) -> Response:
    del timestamp_granularities  # segments are what verbose_json carries; words are not served
    return await _answer(flow, "transcribe", file, model, language, prompt, temperature, response_format)


@router.post("/audio/translations", responses=ANSWERS, summary="Translate speech into English (OpenAI shape)")
async def translations(
    flow: FlowDep,
    file: FileForm,
    model: ModelForm,
    prompt: PromptForm = None,
    temperature: TemperatureForm = None,
    response_format: FormatForm = "json",
) -> Response:
    return await _answer(flow, "translate", file, model, None, prompt, temperature, response_format)


async def _answer(
    flow: JobFlow,
    task: Task,
    file: UploadFile,
    model: str,
    language: str | None,
    prompt: str | None,
    temperature: float | None,
    response_format: Format,
) -> Response:
    data = await read_capped(file, flow.settings.media_max_audio_bytes)
    spec = audio_job(
        task=task, data=data, model=model, language=language, prompt=prompt, temperature=temperature,
        response_format=response_format, priority=INTERACTIVE_PRIORITY,
    )  # fmt: skip
    with flow.hold("wait"):
        job = await flow.wait((await flow.submit(spec)).id)
    headers = {"X-Gemmaq-Job-Id": job.id}
    if job.status != "succeeded" or job.result is None:
        return job_error_response(job, headers)
    answer = answer_of(
        job, task=task, language=language, temperature=temperature, response_format=response_format
    )
    if isinstance(answer, str):
        return PlainTextResponse(answer, headers=headers)
    return JSONResponse(answer, headers=headers)
