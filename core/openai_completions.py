"""The OpenAI completions shape (`POST /v1/completions`): a prompt continued as it stands.

The natural API for a base model such as the 270M, which is a completion model: the prompt goes
to the model as it is, without a chat template. Used by the route and by batch lines that target
it. `prompt` is a string, or a list of strings that fans out to one job per prompt (`choices[i]`
continues `prompt[i]`).

Refused with a 422 rather than ignored: `echo`, `logprobs`, `best_of` and `n` other than 1,
`suffix`, `logit_bias`, penalties other than 0, and prompts given as token ids. `max_tokens`
defaults to 16, as OpenAI's does; `temperature` left out means greedy decoding, as for every
gemmaq job (OpenAI's default is 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import Field, model_validator

from core.openai_chat import StreamOptions, Strict, job_spec
from core.schemas import MAX_STOP_STRINGS, MAX_TEXT_CHARS, JobCreate, JobOut, SafeStr

MAX_PROMPTS = 16  # prompts in one request (each is a job of its own)
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this API

Prompt = Annotated[SafeStr, Field(min_length=1, max_length=MAX_TEXT_CHARS)]


class CompletionRequest(Strict):
    model: SafeStr = Field(min_length=1, max_length=100, description="a gemmaq variant")
    prompt: Prompt | list[Prompt] = Field(description=f"a string, or up to {MAX_PROMPTS} (one job each)")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    # Not served: accepted only at the values that change nothing.
    n: int | None = None
    best_of: int | None = None
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None
    logit_bias: dict[str, float] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None

    @model_validator(mode="after")
    def _served(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and not 1 <= len(self.prompt) <= MAX_PROMPTS:
            raise ValueError(f"prompt: 1 to {MAX_PROMPTS} strings")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop: at most {MAX_STOP_STRINGS} strings")
        refused = {
            "n": self.n not in (None, 1),
            "best_of": self.best_of not in (None, 1),
            "echo": bool(self.echo),
            "logprobs": self.logprobs is not None,
            "suffix": self.suffix is not None,
            "logit_bias": bool(self.logit_bias),
            "frequency_penalty": self.frequency_penalty not in (None, 0),
            "presence_penalty": self.presence_penalty not in (None, 0),
        }
        names = [name for name, bad in refused.items() if bad]
        if names:
            raise ValueError(f"{', '.join(names)}: not served by gemmaq")
        return self

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


def to_jobs(
    request: CompletionRequest, *, priority: int, metadata: dict[str, str] | None = None
) -> list[JobCreate]:
    """One gemmaq job per prompt (422 for what a job cannot express)."""
    params: dict[str, Any] = {"max_new_tokens": request.max_tokens or DEFAULT_MAX_TOKENS}
    for name in ("temperature", "top_p", "seed", "stop"):
        if (value := getattr(request, name)) is not None:
            params[name] = value
    return [
        job_spec(
            {
                "variant": request.model,
                "task": "text",
                "input": {"prompt": prompt},
                "params": params,
                "priority": priority,
                "metadata": {**(metadata or {}), "api": "completions"},
            }
        )
        for prompt in request.prompts()
    ]


def completion_id(job_id: str) -> str:
    return f"cmpl-{job_id}"


def finish_reason(job: JobOut) -> str:
    return "length" if job.result is not None and job.result.finish_reason == "length" else "stop"


def usage(jobs: Sequence[JobOut]) -> dict[str, int]:
    prompt = sum(j.result.usage.input_tokens for j in jobs if j.result is not None)
    completion = sum(j.result.usage.output_tokens for j in jobs if j.result is not None)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(jobs: Sequence[JobOut]) -> dict[str, Any]:
    """Succeeded jobs (one per prompt, in order) as a `text_completion`."""
    first = jobs[0]
    return {
        "id": completion_id(first.id),
        "object": "text_completion",
        "created": int(first.created_at.timestamp()),
        "model": first.variant,
        "choices": [
            {
                "index": i,
                "text": job.result.text if job.result else "",
                "logprobs": None,
                "finish_reason": finish_reason(job),
            }
            for i, job in enumerate(jobs)
        ],
        "usage": usage(jobs),
        "system_fingerprint": None,
    }


def chunk(first: JobOut, index: int, text: str, reason: str | None = None) -> dict[str, Any]:
    """One streamed `text_completion` chunk: new text of choice `index` (`first`: the request's
    first job, which names the completion)."""
    return {
        "id": completion_id(first.id),
        "object": "text_completion",
        "created": int(first.created_at.timestamp()),
        "model": first.variant,
        "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": reason}],
        "system_fingerprint": None,
    }


def usage_chunk(first: JobOut, jobs: Sequence[JobOut]) -> dict[str, Any]:
    """The last chunk when `stream_options.include_usage`: no choices, the usage."""
    return {**chunk(first, 0, ""), "choices": [], "usage": usage(jobs)}
