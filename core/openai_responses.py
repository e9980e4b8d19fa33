"""The OpenAI Responses API shape, and how a response maps onto a gemmaq job and back.

A request becomes an ordinary job (`to_job`): `instructions` as the system turn, then the
conversation so far when `previous_response_id` continues one (its turns and their replies),
then this request's `input` (a string, or message items of `input_text`, `input_image` and
`input_audio` parts). A job becomes a `response` object (`response`): its status mapped
(queued → `queued`, running → `in_progress`, succeeded → `completed`, or `incomplete` when
its token limit cut it, failed or expired → `failed`, cancelled → `cancelled`) and its text
as one assistant message of `output_text`. `text.format` json_object or json_schema holds the
reply to a grammar (core.structured), as the chat route's `response_format` does.

Not served, and refused with a 422 rather than ignored: tools and `tool_choice` other than
none, `reasoning`, `truncation` other than disabled,
`include`, `conversation`, `prompt` templates, `n` > 1. `temperature` left out means greedy
decoding, as for every gemmaq job.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal, Protocol

from pydantic import ConfigDict, Field, field_validator, model_validator

from core import openai_chat
from core.errors import ValidationFailed
from core.openai_chat import Strict, job_spec
from core.schemas import MAX_MESSAGES, MAX_TEXT_CHARS, JobCreate, JobOut, SafeStr

# An output part's annotations (kept with a stored response, never read by the model).
MAX_ANNOTATIONS = 64
MAX_ANNOTATIONS_BYTES = 16_384


class InputText(Strict):
    type: Literal["input_text"]
    text: SafeStr = Field(max_length=MAX_TEXT_CHARS)


class InputImage(Strict):
    type: Literal["input_image"]
    image_url: str | None = Field(None, description="a data URL: data:image/png;base64,…")
    file_id: str | None = Field(None, max_length=64)
    detail: Literal["auto", "low", "high"] | None = None


class InputAudioData(openai_chat.InputAudio):
    # The chat API's `input_audio` object; its own name keeps this API's schema apart.
    pass


class InputAudio(Strict):
    type: Literal["input_audio"]
    input_audio: InputAudioData


class OutputText(Strict):
    type: Literal["output_text"]
    text: SafeStr = Field(max_length=MAX_TEXT_CHARS)
    annotations: list[dict[str, Any]] | None = Field(None, max_length=MAX_ANNOTATIONS)

    @field_validator("annotations")
    @classmethod
    def _bounded(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if value is not None and len(json.dumps(value).encode()) > MAX_ANNOTATIONS_BYTES:
            raise ValueError(f"annotations: at most {MAX_ANNOTATIONS_BYTES} bytes of JSON in a part")
        return value


Part = InputText | InputImage | InputAudio | OutputText


class InputMessage(Strict):
    type: Literal["message"] | None = None
    role: Literal["user", "system", "developer", "assistant"]
    content: SafeStr | list[Part] = Field(max_length=MAX_TEXT_CHARS)
    id: SafeStr | None = Field(None, max_length=64)
    status: SafeStr | None = Field(None, max_length=32)


class TextFormat(Strict):
    """`{"type": "text"}`, `{"type": "json_object"}` or `{"type": "json_schema", "name", "schema", ...}`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    def response_format(self) -> dict[str, Any] | None:
        """The job's `params.response_format` (None for text)."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        if self.schema_ is None:
            raise ValidationFailed("text.format: a json_schema format takes a `schema`")
        spec = {"name": self.name or "response", "schema": self.schema_, "strict": self.strict}
        if self.description is not None:
            spec["description"] = self.description
        return {"type": "json_schema", "json_schema": spec}


class TextOptions(Strict):
    format: TextFormat | None = None


class ResponseRequest(Strict):
    model: SafeStr = Field(min_length=1, max_length=100, description="a gemmaq variant")
    input: SafeStr | list[InputMessage] = Field(max_length=MAX_TEXT_CHARS)
    instructions: SafeStr | None = Field(None, max_length=MAX_TEXT_CHARS)
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    background: bool = False
    store: bool = True
    stream: bool = False
    previous_response_id: str | None = Field(None, max_length=64)
    metadata: (
        dict[Annotated[SafeStr, Field(max_length=64)], Annotated[SafeStr, Field(max_length=512)]] | None
    ) = Field(None, max_length=16)
    user: SafeStr | None = Field(None, max_length=256)
    text: TextOptions | None = None
    tool_choice: Literal["none"] | None = None
    tools: list[Any] | None = Field(None, max_length=0, description="not served")
    parallel_tool_calls: bool | None = None
    truncation: Literal["disabled"] | None = None

    @model_validator(mode="after")
    def _served(self) -> ResponseRequest:
        if self.background and not self.store:
            raise ValueError("background: a background response is stored (store must be true)")
        if isinstance(self.input, list) and not 1 <= len(self.input) <= MAX_MESSAGES:
            raise ValueError(f"input: 1 to {MAX_MESSAGES} items")
        return self

    def items(self) -> list[dict[str, Any]]:
        """The input as message items (a string is one user message)."""
        if isinstance(self.input, str):
            return [{"type": "message", "role": "user", "content": self.input}]
        return [m.model_dump(exclude_none=True) | {"type": "message"} for m in self.input]


def messages_of(items: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], set[str]]:
    """Message items as job messages, and the media kinds they hold."""
    kinds: set[str] = set()
    messages: list[dict[str, Any]] = []
    for item in items:
        role = "system" if item["role"] == "developer" else item["role"]
        content = item["content"]
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
            continue
        parts: list[dict[str, Any]] = []
        for part in content:
            kind = part["type"]
            if kind in ("input_text", "output_text"):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "input_image":
                if part.get("file_id"):
                    parts.append({"type": "image", "file_id": part["file_id"]})
                elif str(part.get("image_url") or "").startswith("data:"):
                    parts.append({"type": "image", "data": part["image_url"]})
                else:
                    raise ValidationFailed(
                        "input_image: a data URL or a file_id (gemmaq does not fetch URLs)",
                        {"image_url": str(part.get("image_url"))[:100]},
                    )
                kinds.add("image")
            else:
                parts.append({"type": "audio", "data": part["input_audio"]["data"]})
                kinds.add("audio")
        messages.append({"role": role, "content": parts})
    return messages, kinds


def to_job(
    request: ResponseRequest, context: list[dict[str, Any]], *, priority: int, metadata: dict[str, str]
) -> JobCreate:
    """The gemmaq job for a response request; `context`: the conversation it continues."""
    messages, kinds = messages_of(request.items())
    if len(kinds) > 1:
        raise ValidationFailed("input: images and audio in one request are not served")
    system = [{"role": "system", "content": request.instructions}] if request.instructions else []
    params: dict[str, Any] = {}
    if request.max_output_tokens is not None:
        params["max_new_tokens"] = request.max_output_tokens
    for name in ("temperature", "top_p"):
        if (value := getattr(request, name)) is not None:
            params[name] = value
    fmt = request.text.format if request.text is not None else None
    if fmt is not None and (response_format := fmt.response_format()) is not None:
        params["response_format"] = response_format
    return job_spec(
        {
            "variant": request.model,
            "task": kinds.pop() if kinds else "text",
            "input": {"messages": [*system, *context, *messages]},
            "params": params,
            "priority": priority,
            "metadata": {**(request.metadata or {}), **metadata},
        }
    )


def continued(
    context: list[dict[str, Any]], items: list[dict[str, Any]], job: JobOut
) -> list[dict[str, Any]]:
    """The conversation after a response: what it continued, its input, its reply."""
    messages, _ = messages_of(items)
    reply = job.result.text if job.result is not None and job.status == "succeeded" else ""
    return [*context, *messages, {"role": "assistant", "content": reply}]


def status_for(job_status: str, finish_reason: str | None) -> str:
    """A response's status, from its job's status and (succeeded) finish reason."""
    if job_status == "queued":
        return "queued"
    if job_status == "running":
        return "in_progress"
    if job_status == "succeeded":
        return "incomplete" if finish_reason == "length" else "completed"  # cut by its token limit
    return "cancelled" if job_status == "cancelled" else "failed"


def status_of(job: JobOut) -> str:
    return status_for(job.status, job.result.finish_reason if job.result is not None else None)


def _epoch(at: datetime | None) -> int | None:
    return int(at.timestamp()) if at is not None else None


def message_id(response_id: str) -> str:
    return "msg_" + response_id.removeprefix("resp_")


def response(
    response_id: str,
    job: JobOut,
    *,
    instructions: str | None,
    max_output_tokens: int | None,
    previous_response_id: str | None,
    background: bool,
    store: bool,
    metadata: dict[str, Any],
    created_at: datetime,
) -> dict[str, Any]:
    """A job as a `response` object."""
    status = status_of(job)
    output: list[dict[str, Any]] = []
    if job.status == "succeeded" and job.result is not None:
        output.append(
            {
                "type": "message",
                "id": message_id(response_id),
                "status": status,
                "role": "assistant",
                "content": [{"type": "output_text", "text": job.result.text, "annotations": []}],
            }
        )
    used = job.result.usage if job.result is not None else None
    tokens_in, tokens_out = (used.input_tokens, used.output_tokens) if used else (0, 0)
    error = None
    if status == "failed" and job.error is not None:
        error = {"code": job.error.code, "message": job.error.message}
    return {
        "id": response_id,
        "object": "response",
        "created_at": _epoch(created_at),
        "status": status,
        "background": background,
        "model": job.variant,
        "output": output,
        "output_text": job.result.text if output and job.result is not None else "",
        "usage": {
            "input_tokens": tokens_in,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": tokens_out,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": tokens_in + tokens_out,
        }
        if used
        else None,
        "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": instructions,
        "max_output_tokens": max_output_tokens,
        "previous_response_id": previous_response_id,
        "store": store,
        "metadata": metadata,
        "parallel_tool_calls": False,
        "tool_choice": "none",
        "tools": [],
        "text": {"format": {"type": "text"}},
        "truncation": "disabled",
        "gemmaq_job_id": job.id,
    }


class ResponseRow(Protocol):
    """What `response_of` reads of a stored response (db.models.StoredResponse)."""

    id: str
    instructions: str | None
    max_output_tokens: int | None
    previous_response_id: str | None
    background: bool
    metadata_: dict[str, Any]


def response_of(
    row: ResponseRow, job: JobOut, *, store: bool = True, created_at: datetime | None = None
) -> dict[str, Any]:
    """A stored response (or one being made, `store` false) and its job, as a `response` object."""
    return response(
        row.id, job, instructions=row.instructions, max_output_tokens=row.max_output_tokens,
        previous_response_id=row.previous_response_id, background=row.background, store=store,
        metadata=row.metadata_, created_at=created_at or job.created_at,
    )  # fmt: skip


def stored_bytes(body: ResponseRequest, context: list[dict[str, Any]]) -> int:
    """What a stored response keeps, as JSON bytes: counted in its owner's storage quota."""
    kept = [body.items(), context, body.instructions, body.metadata]
    return len(json.dumps(kept, ensure_ascii=False).encode())
