"""The OpenAI chat-completions shape, and how it maps onto gemmaq jobs and back.

Used by `POST /v1/chat/completions` and by the lines of a batch (the Batch API's bodies are chat
completion requests). A request becomes an ordinary job (`to_job`); a finished job becomes a
`chat.completion` (`completion`) or, streamed, `chat.completion.chunk`s (`chunk`).

`response_format` (json_object, json_schema) and `tool_choice` (none, auto, required, a named
function) constrain the reply (core.structured). Not served, and refused with a 422 rather than
ignored: `n` > 1, `logprobs`, penalties other than 0, `tool` and function-call messages, image URLs that are
not data URLs (gemmaq never fetches URLs). `temperature` left out means greedy decoding, as for
every gemmaq job (OpenAI's default is 1).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.errors import ValidationFailed
from core.schemas import MAX_MESSAGES, MAX_STOP_STRINGS, MAX_TEXT_CHARS, JobCreate, JobOut, SafeStr
from core.structured import ResponseFormat, ToolChoice


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageUrl(Strict):
    url: str = Field(description="a data URL: data:image/png;base64,…")
    detail: Literal["auto", "low", "high"] | None = None


class ImageUrlPart(Strict):
    type: Literal["image_url"]
    image_url: ImageUrl


class InputAudio(Strict):
    data: str = Field(description="base64 audio")
    format: str | None = None


class InputAudioPart(Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


class TextContentPart(Strict):
    type: Literal["text"]
    text: SafeStr = Field(max_length=MAX_TEXT_CHARS)


ContentPart = TextContentPart | ImageUrlPart | InputAudioPart


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: SafeStr | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(Strict):
    include_usage: bool = False


class ChatRequest(Strict):
    model: SafeStr = Field(min_length=1, max_length=100, description="a gemmaq variant")
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    tools: list[dict[str, Any]] | None = Field(None, max_length=32)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] | None = None
    logprobs: Literal[False] | None = None
    frequency_penalty: Literal[0] | None = None
    presence_penalty: Literal[0] | None = None
    response_format: ResponseFormat | None = None
    user: str | None = Field(None, max_length=256)
    metadata: dict[str, str] | None = None
    store: bool | None = None

    @model_validator(mode="after")
    def _served(self) -> ChatRequest:
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} strings")
        return self


def to_job(request: ChatRequest, *, priority: int, metadata: dict[str, str] | None = None) -> JobCreate:
    """The gemmaq job for a chat completion request (422 for what a job cannot express)."""
    kinds: set[str] = set()
    messages: list[dict[str, Any]] = []
    for m in request.messages:
        role = "system" if m.role == "developer" else m.role
        if m.content is None:
            raise ValidationFailed("messages: a message without content (tool calls) is not served")
        if isinstance(m.content, str):
            messages.append({"role": role, "content": m.content})
            continue
        parts: list[dict[str, Any]] = []
        for part in m.content:
            if isinstance(part, TextContentPart):
                parts.append({"type": "text", "text": part.text})
            elif isinstance(part, ImageUrlPart):
                if not part.image_url.url.startswith("data:"):
                    raise ValidationFailed(
                        "image_url: only data URLs are served (gemmaq does not fetch URLs); "
                        "or upload the image with POST /v1/files and submit a job",
                        {"url": part.image_url.url[:100]},
                    )
                parts.append({"type": "image", "data": part.image_url.url})
                kinds.add("image")
            else:
                parts.append({"type": "audio", "data": part.input_audio.data})
                kinds.add("audio")
        messages.append({"role": role, "content": parts})
    if len(kinds) > 1:
        raise ValidationFailed("messages: images and audio in one request are not served")
    params: dict[str, Any] = {}
    limit = request.max_completion_tokens or request.max_tokens
    if limit is not None:
        params["max_new_tokens"] = limit
    for name in ("temperature", "top_p", "seed", "stop"):
        if (value := getattr(request, name)) is not None:
            params[name] = value
    job_input: dict[str, Any] = {"messages": messages}
    if request.tools and request.tool_choice != "none":
        job_input["tools"] = request.tools
        if request.tool_choice is not None:
            params["tool_choice"] = _dumped(request.tool_choice)
    elif request.tool_choice not in (None, "none", "auto"):
        raise ValidationFailed("tool_choice: a tool is required, but no tools were given")
    if request.response_format is not None and request.response_format.type != "text":
        params["response_format"] = request.response_format.model_dump(mode="json", exclude_none=True)
    return job_spec(
        {
            "variant": request.model,
            "task": kinds.pop() if kinds else "text",
            "input": job_input,
            "params": params,
            "priority": priority,
            "metadata": {**(request.metadata or {}), **(metadata or {})},
        }
    )


def _dumped(value: Any) -> Any:
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def job_spec(body: dict[str, Any]) -> JobCreate:
    """The job an OpenAI-shaped request maps to, or a 422 naming the first field it breaks."""
    try:
        return JobCreate.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValidationFailed(
            f"{where}: {first['msg']}",
            {"errors": [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]},
        ) from exc


def completion_id(job_id: str) -> str:
    return f"chatcmpl-{job_id}"


def finish_reason(job: JobOut) -> str:
    reason = job.result.finish_reason if job.result else "stop"
    return reason if reason in ("length", "tool_calls") else "stop"


def tool_calls(job: JobOut) -> list[dict[str, Any]] | None:
    if job.result is None or not job.result.tool_calls:
        return None
    return [
        {
            "id": f"call_{job.id.removeprefix('job_')}_{i}",
            "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
        }
        for i, call in enumerate(job.result.tool_calls)
    ]


def usage(job: JobOut) -> dict[str, int]:
    used = job.result.usage if job.result else None
    prompt, completion = (used.input_tokens, used.output_tokens) if used else (0, 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(job: JobOut) -> dict[str, Any]:
    """A succeeded job as a `chat.completion`."""
    calls = tool_calls(job)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": None if calls else job.result and job.result.text,
    }
    if calls:
        message["tool_calls"] = calls
    return {
        "id": completion_id(job.id),
        "object": "chat.completion",
        "created": int(job.created_at.timestamp()),
        "model": job.variant,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(job), "logprobs": None}],
        "usage": usage(job),
        "system_fingerprint": None,
    }


def chunk(job: JobOut, delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
    """One `chat.completion.chunk` of a streamed completion."""
    return {
        "id": completion_id(job.id),
        "object": "chat.completion.chunk",
        "created": int(job.created_at.timestamp()),
        "model": job.variant,
        "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}],
        "system_fingerprint": None,
    }


def usage_chunk(job: JobOut) -> dict[str, Any]:
    """The last chunk when `stream_options.include_usage`: no choices, the usage."""
    return {**chunk(job, {}), "choices": [], "usage": usage(job)}
