"""What crosses the channel between a worker's shell and its engine process.

Each message is a small dataclass, pickled by `multiprocessing.connection` over a Unix socket
pair that only these two processes hold (see README "Internals: the engine process"). Media
travel decoded inside the `Request` (PIL images, float32 arrays), so the engine never touches
PostgreSQL or a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from core.settings import Settings
from workers.shared.base import EngineFailure, Request, RequestError, Result, ShuttingDown

# ---- shell → engine -------------------------------------------------------------------------


@dataclass
class Start:
    """The engine's work: serve `names`, load `preload` (None: all that fit) before `Ready`."""

    settings: Settings
    worker: str
    names: list[str]
    preload: list[str] | None


@dataclass
class Submit:
    rid: int
    variant: str
    request: Request


@dataclass
class Cancel:
    """Stop the job's row at its next step; `at` is when the stop was asked (epoch seconds)."""

    job_id: str
    at: float


@dataclass
class Drain:
    """SIGTERM: no new batches; requests still waiting come back `ShuttingDown`."""


@dataclass
class Stop:
    """Exit once the batches in hand are done (or at once, if the shell is gone)."""


# ---- engine → shell -------------------------------------------------------------------------


@dataclass
class Hello:
    device: str
    pid: int
    threads: int


@dataclass
class States:
    """The warm variant cache as `/v1/models` shows it, sent on every change and periodically."""

    variants: dict[str, dict[str, Any]]
    budget_bytes: int
    used_bytes: int
    memory_bytes: int | None


@dataclass
class Ready:
    """The variants to preload are loaded (or found unavailable): jobs may come."""


@dataclass
class Deltas:
    items: list[tuple[str, str]]  # (job id, new text)
    # job id → (its prompt's tokens, the tokens its row had generated): where a re-sent request
    # picks up, and what a job that ends without a result is charged
    progress: dict[str, tuple[int, list[int]]] = field(default_factory=dict)


FailureKind = Literal["shutting_down", "refused", "failed"]


@dataclass
class Done:
    rid: int
    result: Result | None = None
    failure: FailureKind | None = None
    message: str = ""  # the refusal's text, or the name of the exception that failed it
    spent: tuple[int, int] | None = None  # a refusal's (prompt, generated) tokens, mid-reply
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, rid: int, outcome: Result | BaseException) -> Done:
        """Exceptions become data: an arbitrary one may not pickle, nor mean anything to the shell."""
        if isinstance(outcome, Result):
            return cls(rid, result=outcome)
        if isinstance(outcome, ShuttingDown):
            return cls(rid, failure="shutting_down")
        if isinstance(outcome, RequestError):
            return cls(rid, failure="refused", message=str(outcome), spent=outcome.spent)
        return cls(rid, failure="failed", message=type(outcome).__name__)

    def outcome(self) -> Result | Exception:
        if self.result is not None:
            return self.result
        if self.failure == "shutting_down":
            return ShuttingDown()
        if self.failure == "refused":
            return RequestError(self.message, self.spent)
        return EngineFailure(self.message)


ToEngine = Start | Submit | Cancel | Drain | Stop
FromEngine = Hello | States | Ready | Deltas | Done
