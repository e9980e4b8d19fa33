"""The runtime's interface: a request in, a result out, engines that batch them.

An engine is loaded for one variant and runs in the engine process (workers.engine). How its
requests are batched is the variant's `batching` (core/variants.toml), not the engine's type:
`static` engines take a whole batch (`StaticEngine.generate`), `continuous` ones are run step
by step (`workers.engine.continuous.ContinuousEngine`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from core.schemas import FinishReason, GenerationParams, Tool

__all__ = [
    "AdapterRef",
    "CancelCheck",
    "Engine",
    "EngineFailure",
    "FinishReason",
    "Request",
    "RequestError",
    "Result",
    "StaticEngine",
]


@dataclass(frozen=True)
class AdapterRef:
    """A LoRA adapter a request runs through (workers.engine.lora): its id, its weights' digest,
    the safetensors file the shell wrote them to, and its scale (alpha / r)."""

    id: str
    sha256: str
    path: str
    scale: float


@dataclass
class Request:
    job_id: str
    # Chat turns; media parts carry their decoded payload: {"type": "image", "image": PIL.Image}
    # or {"type": "audio", "audio": float32 mono ndarray at 16 kHz}.
    messages: list[dict[str, Any]] | None
    prompt: str | None
    params: GenerationParams
    # Monotonic time the worker took the job; time to first token counts from here.
    started: float = 0.0
    tools: list[Tool] | None = None
    images: int = 0
    audio_clips: int = 0
    audio_seconds: float = 0.0
    preprocess_ms: float = 0.0
    media_bytes: int = 0  # its images' pixels and waveforms' samples, as decoded by the shell
    # Set in the engine process: the grammar its reply is held to, once read (`grammar_read`:
    # None is free text), and the grammar's matcher (workers.engine.constrain).
    grammar: str | None = None
    grammar_read: bool = False
    constraint: Any = None
    # A request sent again after its engine died: the tokens it had generated, as its last
    # deltas reported them. A continuous decoder picks up from them, so the text it goes on
    # with starts with what was already published.
    resume_tokens: list[int] | None = None
    adapter: AdapterRef | None = None  # decoded through this LoRA adapter, else the base model


@dataclass
class Result:
    text: str
    finish_reason: FinishReason
    input_tokens: int
    output_tokens: int
    time_to_first_token_ms: float | None
    inference_ms: float
    batch_size: int
    load_ms: float | None = None
    peak_memory_bytes: int | None = None
    # Pre-processing inside the engine (processor / feature extraction), per request.
    preprocess_ms: float = 0.0
    # Cancelled: decoding steps run between the cancel request and the stop (1 = the next step).
    cancel_lag_steps: int | None = None
    grammar_compile_ms: float | None = None
    grammar_mask_ms: float | None = None  # mean per step
    error: str | None = None  # the request failed after all (the batcher raises RequestError)
    extra: dict[str, Any] = field(default_factory=dict)


class ShuttingDown(Exception):
    """The worker is stopping and never started this request: it goes back to the queue."""


class RequestError(Exception):
    """A request this engine refuses (too long, malformed), or one that failed mid-reply; the job
    fails, the worker goes on. `spent`: the (prompt, generated) tokens it had used by then."""

    def __init__(self, message: str, spent: tuple[int, int] | None = None) -> None:
        super().__init__(message)
        self.spent = spent


class EngineFailure(Exception):
    """Generation raised in the engine process; `kind` names the exception it raised there."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


# Asked between decoding steps: which of these job ids should stop now? For each, the time
# (epoch seconds) its cancel was requested, or None.
CancelCheck = Callable[[Sequence[str]], list[float | None]]


class Engine(Protocol):
    name: str
    device: str

    def warmup(self) -> None: ...


class StaticEngine(Engine, Protocol):
    """Runs a whole batch at once: its rows come back together."""

    def generate(self, batch: Sequence[Request], cancelled: CancelCheck) -> list[Result | Exception]: ...
