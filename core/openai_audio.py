"""OpenAI's audio transcription and translation: the job a request becomes, and the answer in its
`response_format` — `json`, `text`, `srt`, `vtt` or `verbose_json` (`duration`, `language`,
`segments`). Whisper's timestamp tokens give the segments' times (`params.timestamps`); a model
without them (Gemma 3n) gives one segment for the whole clip."""

from __future__ import annotations

import base64
from typing import Any, Literal

from core.openai_chat import job_spec
from core.schemas import JobCreate, JobOut

Format = Literal["json", "text", "srt", "vtt", "verbose_json"]
Task = Literal["transcribe", "translate"]
TIMED = ("srt", "vtt", "verbose_json")
INSTRUCTIONS = {"transcribe": "Transcribe the speech.", "translate": "Translate the speech into English."}


def audio_job(
    *,
    task: Task,
    data: bytes,
    model: str,
    language: str | None,
    prompt: str | None,
    temperature: float | None,
    response_format: Format,
    priority: int,
) -> JobCreate:
    """The audio job a request becomes: the clip, and the instruction (`prompt`, for Gemma 3n)."""
    params: dict[str, Any] = {"audio_task": task, "timestamps": response_format in TIMED}
    if language is not None:
        params["language"] = language
    if temperature:
        params["temperature"] = temperature
    audio = {"type": "audio", "data": base64.b64encode(data).decode()}
    text = {"type": "text", "text": prompt or INSTRUCTIONS[task]}
    return job_spec(
        {
            "variant": model,
            "task": "audio",
            "input": {"messages": [{"role": "user", "content": [audio, text]}]},
            "params": params,
            "priority": priority,
            "metadata": {"api": f"audio.{task}"},
        }
    )


def answer_of(
    job: JobOut, *, task: Task, language: str | None, temperature: float | None, response_format: Format
) -> dict[str, Any] | str:
    """A succeeded job's answer: a JSON object (`json`, `verbose_json`), else plain text."""
    assert job.result is not None
    if response_format == "json":
        return {"text": job.result.text, "usage": _usage(job)}
    if response_format == "text":
        return job.result.text
    segments = _segments(job)
    if response_format == "verbose_json":
        return {
            "task": task,
            "language": job.result.language or language,
            "duration": _duration(job),
            "text": job.result.text,
            "segments": [_verbose(i, s, temperature or 0.0) for i, s in enumerate(segments)],
            "usage": _usage(job),
        }
    return _srt(segments) if response_format == "srt" else _vtt(segments)


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
