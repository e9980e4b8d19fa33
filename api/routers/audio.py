"""`POST /v1/audio/transcriptions` and `POST /v1/audio/translations`: OpenAI's audio shape
(multipart, as the SDK sends it) over an ordinary audio job.

The uploaded file becomes the job's audio (checked and stored as every job's media is: its
type sniffed, its length under the variant's cap), the request waits for the job as chat
completions do, and the text comes back in `response_format`: `json`, `text`, `srt`, `vtt` or
`verbose_json` (`duration`, `language`, `segments`). Whisper's timestamp tokens give the
segments' times (`params.timestamps`); a model without them (Gemma 3n) gives one segment for
the whole clip. The job's id is in `X-Gemmaq-Job-Id`.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from api.deps import FlowDep
from api.errors import job_error_response, responses
from api.flow import INTERACTIVE_PRIORITY, JobFlow
from api.media_admission import read_capped
from core.openai_chat import job_spec
from core.schemas import JobOut

router = APIRouter(tags=["openai"])

Format = Literal["json", "text", "srt", "vtt", "verbose_json"]
TIMED = ("srt", "vtt", "verbose_json")
INSTRUCTIONS = {"transcribe": "Transcribe the speech.", "translate": "Translate the speech into English."}
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
    task: Literal["transcribe", "translate"],
    file: UploadFile,
    model: str,
    language: str | None,
    prompt: str | None,
    temperature: float | None,
    response_format: Format,
) -> Response:
    data = await read_capped(file, flow.settings.media_max_audio_bytes)
    params: dict[str, Any] = {"audio_task": task, "timestamps": response_format in TIMED}
    if language is not None:
        params["language"] = language
    if temperature:
        params["temperature"] = temperature
    audio = {"type": "audio", "data": base64.b64encode(data).decode()}
    text = {"type": "text", "text": prompt or INSTRUCTIONS[task]}
    spec = job_spec(
        {
            "variant": model,
            "task": "audio",
            "input": {"messages": [{"role": "user", "content": [audio, text]}]},
            "params": params,
            "priority": INTERACTIVE_PRIORITY,
            "metadata": {"api": f"audio.{task}"},
        }
    )
    with flow.hold("wait"):
        job = await flow.wait((await flow.submit(spec)).id)
    headers = {"X-Gemmaq-Job-Id": job.id}
    if job.status != "succeeded" or job.result is None:
        return job_error_response(job, headers)
    if response_format == "json":
        return JSONResponse({"text": job.result.text, "usage": _usage(job)}, headers=headers)
    if response_format == "text":
        return PlainTextResponse(job.result.text, headers=headers)
    segments = _segments(job)
    if response_format == "verbose_json":
        body = {
            "task": task,
            "language": job.result.language or language,
            "duration": _duration(job),
            "text": job.result.text,
            "segments": [_verbose(i, s, temperature or 0.0) for i, s in enumerate(segments)],
            "usage": _usage(job),
        }
        return JSONResponse(body, headers=headers)
    cues = _srt(segments) if response_format == "srt" else _vtt(segments)
    return PlainTextResponse(cues, headers=headers)


def _verbose(i: int, segment: dict[str, Any], temperature: float) -> dict[str, Any]:
    """A segment as OpenAI's verbose_json has it (the fields Whisper's decoding here does not
    measure are 0)."""
    return {
        "id": i, "seek": 0, "start": segment["start"], "end": segment["end"], "text": segment["text"],
        "tokens": [], "temperature": temperature, "avg_logprob": 0.0, "compression_ratio": 0.0,
        "no_speech_prob": 0.0,
    }  # fmt: skip


def _duration(job: JobOut) -> float:
    seconds = job.metrics.audio_seconds if job.metrics is not None else None
    return round(seconds or 0.0, 2)


def _usage(job: JobOut) -> dict[str, Any]:
    """OpenAI's duration usage for speech: the seconds of audio."""
    return {"type": "duration", "seconds": round(_duration(job))}


def _segments(job: JobOut) -> list[dict[str, Any]]:
    assert job.result is not None
    if job.result.segments:
        return [s.model_dump() for s in job.result.segments]
    return [{"start": 0.0, "end": _duration(job), "text": job.result.text}]  # one cue: the whole clip


def _clock(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _srt(segments: list[dict[str, Any]]) -> str:
    return "".join(
        f"{i}\n{_clock(s['start'], ',')} --> {_clock(s['end'], ',')}\n{s['text']}\n\n"
        for i, s in enumerate(segments, start=1)
    )


def _vtt(segments: list[dict[str, Any]]) -> str:
    cues = (f"{_clock(s['start'], '.')} --> {_clock(s['end'], '.')}\n{s['text']}\n\n" for s in segments)
    return "WEBVTT\n\n" + "".join(cues)
