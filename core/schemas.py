"""The public job contract as pydantic models, shared by the API, the workers and the client.

The statuses a job and a batch move through are spelled out here and nowhere else: every set of
them (the terminal ones, the database's check constraint, the client's wait) is derived from these."""

from __future__ import annotations

import json
from datetime import date, datetime
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from core.structured import ResponseFormat, ToolChoice, depth

ActiveStatus = Literal["queued", "running"]
TerminalStatus = Literal["succeeded", "failed", "cancelled", "expired"]
JobStatus = Literal[ActiveStatus, TerminalStatus]
JOB_STATUSES: tuple[str, ...] = get_args(ActiveStatus) + get_args(TerminalStatus)
ACTIVE_STATUSES: tuple[str, ...] = get_args(ActiveStatus)
TERMINAL_STATUSES: frozenset[str] = frozenset(get_args(TerminalStatus))

# An OpenAI batch: working until it ends in one of the ended statuses.
BatchWorking = Literal["validating", "in_progress", "finalizing", "cancelling"]
BatchEnded = Literal["completed", "failed", "cancelled", "expired"]
BatchStatus = Literal[BatchWorking, BatchEnded]
BATCH_WORKING: tuple[str, ...] = get_args(BatchWorking)
BATCH_ENDED: frozenset[str] = frozenset(get_args(BatchEnded))
Role = Literal["system", "user", "assistant"]

MAX_MESSAGES = 50
MAX_TEXT_CHARS = 32_000
MAX_STOP_STRINGS = 8
MAX_SCHEMA_BYTES = 16_384  # a tool's `parameters`, as JSON
MAX_SCHEMA_DEPTH = 16  # nesting of objects and arrays in a tool's `parameters`


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("text must not contain NUL (\\u0000) characters")
    return value


# Every user-supplied string: PostgreSQL cannot store NUL in text or jsonb.
SafeStr = Annotated[str, AfterValidator(_no_nul)]
# An adapter's name (lower-case letters, digits, `.`, `-`; 64 at most) or its id (`adapter_…`).
ADAPTER_NAME = r"^[a-z0-9][a-z0-9.-]{0,63}$"
ADAPTER_REF = r"^(?:[a-z0-9][a-z0-9.-]{0,63}|adapter_[a-z0-9]{25})$"


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: SafeStr = Field(max_length=MAX_TEXT_CHARS)


class _MediaPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: str | None = Field(None, description="base64 bytes, or a base64 data URL")
    file_id: SafeStr | None = Field(None, max_length=64, description="a file uploaded with POST /v1/files")

    @model_validator(mode="after")
    def _one_source(self) -> _MediaPart:
        if (self.data is None) == (self.file_id is None):
            raise ValueError("a media part takes exactly one of `data` or `file_id`")
        return self


class ImagePart(_MediaPart):
    type: Literal["image"]


class AudioPart(_MediaPart):
    type: Literal["audio"]


Part = Annotated[TextPart | ImagePart | AudioPart, Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Role
    content: (
        Annotated[SafeStr, Field(max_length=MAX_TEXT_CHARS)]
        | Annotated[list[Part], Field(min_length=1, max_length=64)]
    )

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))

    def media(self) -> list[ImagePart | AudioPart]:
        if isinstance(self.content, str):
            return []
        return [part for part in self.content if not isinstance(part, TextPart)]


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")]
    description: SafeStr = Field("", max_length=2000)
    parameters: dict[str, Any] = Field(default_factory=dict, description="a JSON schema of the arguments")
    strict: bool | None = Field(None, description="OpenAI's flag; with tool_choice, arguments always match")

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, value: dict[str, Any]) -> dict[str, Any]:
        if depth(value) > MAX_SCHEMA_DEPTH:
            raise ValueError(f"`parameters` nests deeper than {MAX_SCHEMA_DEPTH} levels")
        dumped = json.dumps(value, allow_nan=False)
        if len(dumped.encode()) > MAX_SCHEMA_BYTES:
            raise ValueError(f"`parameters` is more than {MAX_SCHEMA_BYTES} bytes of JSON")
        if "\\u0000" in dumped:
            raise ValueError("`parameters` must not contain NUL (\\u0000) characters")
        properties = value.get("properties", {})
        if not isinstance(properties, dict) or not all(isinstance(v, dict) for v in properties.values()):
            raise ValueError("`parameters.properties` must map each argument name to a JSON schema object")
        return value


class Tool(BaseModel):
    """A tool in the OpenAI form `{"type": "function", "function": {...}}` or the bare form
    `{"name", "description", "parameters"}`."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function"] = "function"
    function: FunctionSpec

    @model_validator(mode="before")
    @classmethod
    def _bare(cls, value: Any) -> Any:
        if isinstance(value, dict) and "function" not in value and "name" in value:
            return {"type": "function", "function": value}
        return value


class JobInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[Message] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    prompt: SafeStr | None = Field(None, min_length=1, max_length=MAX_TEXT_CHARS)
    tools: list[Tool] | None = Field(None, min_length=1, max_length=32)

    @model_validator(mode="after")
    def _one_of(self) -> JobInput:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("input takes exactly one of `messages` or `prompt`")
        if self.messages is not None:
            if not any(m.text().strip() or m.media() for m in self.messages):
                raise ValueError("messages hold no text")
            if any(m.role == "system" for m in self.messages[1:]):
                raise ValueError("a system message may only come first")
            if self.messages[-1].role != "user":
                raise ValueError("the last message must be from the user")
        return self

    def media(self) -> list[ImagePart | AudioPart]:
        return [part for m in self.messages or [] for part in m.media()]

    def text(self) -> str:
        """The input's text as the model reads it, the tools' declarations included: what the
        size budgets and the token reservation count."""
        text = self.prompt if self.prompt is not None else "".join(m.text() for m in self.messages or [])
        if self.tools:
            text += json.dumps([t.model_dump() for t in self.tools])
        return text

    def chars(self) -> int:
        """Characters of text in the input, for the size budget checked at admission."""
        return len(self.text())


class GenerationParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 → greedy decoding")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1000, description="0 → no top-k cut")
    repetition_penalty: float = Field(1.0, gt=0.0, le=2.0)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    timeout_s: float | None = Field(
        None,
        gt=0,
        le=86_400,
        description="end TIMEOUT after this long running; at most the variant's",
    )
    stop: list[Annotated[SafeStr, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list, max_length=MAX_STOP_STRINGS
    )

    # Audio jobs: transcribe the speech, or translate it into `target_language`.
    audio_task: Literal["transcribe", "translate"] = "transcribe"
    language: Annotated[SafeStr, Field(max_length=40)] | None = Field(
        None, description="the speech's language"
    )
    target_language: Annotated[SafeStr, Field(max_length=40)] | None = Field(
        None, description="translate into this language (audio_task=translate)"
    )
    timestamps: bool = Field(False, description="audio (Whisper): the result's segments, with their times")

    # Structured outputs (core.structured): the reply is held to a grammar as it is decoded.
    response_format: ResponseFormat | None = Field(
        None, description="json_object, or json_schema with a schema: the reply parses by construction"
    )
    tool_choice: ToolChoice | None = Field(
        None,
        description="with input.tools: none (no tools offered), auto (text, or a valid call), required "
        "or {type: function, function: {name}} (the reply is a call whose arguments match the tool's schema)",
    )
    # LoRA adapters (POST /v1/adapters): the job is decoded through this one.
    adapter: str | None = Field(
        None,
        pattern=ADAPTER_REF,
        description="a LoRA adapter for the variant, by name (yours, or one published to every tenant) "
        'or id; the job records its id. `variant: "gemma-3-270m:NAME"` says the same',
    )

    def constrained(self) -> bool:
        """Whether decoding is held to a grammar (see core.structured.grammar_of)."""
        fmt = self.response_format
        return (fmt is not None and fmt.type != "text") or self.tool_choice not in (None, "none")

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    variant: SafeStr = Field("gemma-3-270m", min_length=1, max_length=100)
    task: Literal["text", "image", "audio"] = "text"
    input: JobInput
    params: GenerationParams = Field(default_factory=GenerationParams)
    priority: int = Field(5, ge=0, le=9, description="0 lowest, 9 highest")
    webhook_url: SafeStr | None = Field(None, max_length=2000)
    expires_at: datetime | None = Field(
        None, description="a job still queued at this time ends `expired` without running"
    )
    metadata: dict[Annotated[SafeStr, Field(max_length=100)], Annotated[SafeStr, Field(max_length=1000)]] = (
        Field(default_factory=dict, max_length=32)
    )

    @model_validator(mode="before")
    @classmethod
    def _variant_and_adapter(cls, data: Any) -> Any:
        """`variant: "BASE:ADAPTER"` (an OpenAI route's `model`) is the variant BASE with
        `params.adapter: ADAPTER`."""
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("variant"), str)
            or ":" not in data["variant"]
        ):
            return data
        variant, adapter = data["variant"].split(":", 1)
        params = data.get("params")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            return data  # the params' own check says what is wrong
        if params.get("adapter") not in (None, adapter):
            raise ValueError(f"variant names adapter {adapter!r} and params.adapter {params['adapter']!r}")
        return {**data, "variant": variant, "params": {**params, "adapter": adapter}}


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int


FinishReason = Literal["stop", "length", "cancelled", "tool_calls", "tool_call_unparsed", "content_filter"]


class ToolCall(BaseModel):
    name: str
    arguments: dict[str, Any]


class Segment(BaseModel):
    start: float = Field(description="seconds into the audio")
    end: float
    text: str


class JobResult(BaseModel):
    text: str
    finish_reason: FinishReason = Field(
        description="tool_calls: calls parsed into tool_calls; tool_call_unparsed: the reply tried to call a "
        "tool but could not be parsed, its text is kept; content_filter: the output fell in a moderation "
        "category and its text is withheld (the job failed RESPONSE_FILTERED)"
    )
    tool_calls: list[ToolCall] | None = None
    usage: Usage
    segments: list[Segment] | None = Field(None, description="params.timestamps: the speech's segments")
    language: str | None = Field(None, description="params.timestamps: the speech's language")


class JobError(BaseModel):
    code: str
    message: str


class JobMetrics(BaseModel):
    attempt: int
    queue_ms: float | None
    load_ms: float | None
    time_to_first_token_ms: float | None
    inference_ms: float | None
    total_ms: float | None
    input_tokens: int | None
    output_tokens: int | None
    tokens_per_second: float | None
    batch_size: int | None
    images: int | None
    audio_clips: int | None
    audio_seconds: float | None
    media_bytes: int | None = Field(
        None, description="the job's images and audio once decoded on the worker (pixels and samples)"
    )
    preprocess_ms: float | None
    peak_memory_bytes: int | None
    grammar_compile_ms: float | None = Field(
        None, description="constrained decoding: compiling the job's grammar (0 when it was cached)"
    )
    grammar_mask_ms: float | None = Field(None, description="constrained decoding: masking, mean per step")
    worker: str | None
    device: str | None


class JobOut(BaseModel):
    id: str
    status: JobStatus
    variant: str
    task: str
    priority: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    expires_at: datetime | None = None
    result: JobResult | None
    error: JobError | None
    metrics: JobMetrics | None
    metadata: dict[str, str]
    attempts: int


class QuotaUpdate(BaseModel):
    """Fields left out keep their value; `allowed_variants: null` allows every variant."""

    model_config = ConfigDict(extra="forbid")
    requests_per_minute: int | None = Field(None, ge=0, le=1_000_000)
    tokens_per_day: int | None = Field(None, ge=0, le=10**12)
    max_concurrent_jobs: int | None = Field(None, ge=0, le=100_000)
    max_input_bytes: int | None = Field(None, ge=0, le=10**10)
    allowed_variants: list[Annotated[SafeStr, Field(max_length=100)]] | None = Field(None, max_length=200)
    max_storage_bytes: int | None = Field(None, ge=0, le=10**13)
    max_files: int | None = Field(None, ge=0, le=10**7)
    max_priority: int | None = Field(
        None, ge=0, le=9, description="the highest priority the user's jobs reach among other users'"
    )
    moderation_policy: dict[str, Any] | None = Field(
        None, description="a whole moderation policy in place of the deployment's; null: the deployment's"
    )

    @field_validator("moderation_policy")
    @classmethod
    def _a_policy(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        from core.moderation import PolicyError, parse

        try:
            return parse(value).model_dump()
        except PolicyError as exc:
            raise ValueError(f"not a moderation policy: {exc}") from None


class QuotaOut(BaseModel):
    requests_per_minute: int
    tokens_per_day: int
    max_concurrent_jobs: int
    max_input_bytes: int
    allowed_variants: list[str] | None
    max_storage_bytes: int
    max_files: int
    max_priority: int | None = Field(
        None, description="above it, `priority` orders only your own jobs (null: the deployment's)"
    )


class AdminQuotaOut(QuotaOut):
    """A quota as admins see it: with the user's moderation override (never shown to the user)."""

    moderation_policy: dict[str, Any] | None = None


class UserOut(BaseModel):
    id: str
    name: str
    is_admin: bool
    created_at: datetime
    quota: AdminQuotaOut | None
    active_keys: list[str] = Field(description="visible prefixes of the user's unrevoked keys")


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.@-]{1,100}$")]
    is_admin: bool = False
    quota: QuotaUpdate | None = None


class KeyCreated(BaseModel):
    user: str
    prefix: str
    key: str = Field(description="shown once; only its hash is stored")


class JobList(BaseModel):
    data: list[JobOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null on the last")
    has_more: bool


class RequestWindow(BaseModel):
    limit: int = Field(description="job submissions per sliding minute")
    used: int
    remaining: int
    window_s: int
    reset_s: int = Field(description="seconds until the oldest submission in the window leaves it")


class TokenWindow(BaseModel):
    limit: int = Field(description="input + output tokens per UTC day")
    used: int = Field(description="tokens of today's finished jobs (the usage ledger)")
    reserved: int = Field(description="tokens held for queued and running jobs until they settle")
    remaining: int
    resets_at: datetime


class ConcurrencyWindow(BaseModel):
    limit: int = Field(description="jobs queued or running at once")
    active: int
    remaining: int


class DayUsage(BaseModel):
    day: date
    input_tokens: int
    output_tokens: int
    total_tokens: int
    jobs: int = Field(description="jobs that used tokens, charged to the day they were submitted")


class StorageWindow(BaseModel):
    limit_bytes: int
    used_bytes: int
    limit_files: int
    files: int


class UsageOut(BaseModel):
    user: str
    limits: QuotaOut
    requests: RequestWindow
    tokens: TokenWindow
    concurrent_jobs: ConcurrencyWindow
    storage: StorageWindow = Field(description="the files you keep (uploads, batch outputs, inline media)")
    days: list[DayUsage] = Field(description="per-day token use from the usage ledger, newest first")
