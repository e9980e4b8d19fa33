"""What `/metrics` counts of ended jobs, kept in Redis so every process adds to one total.

Workers, the reconciler and the API each end jobs; Prometheus scrapes the API. Each ending adds
to Redis hashes under `<namespace>:metrics:*` (one pipeline per group of jobs), and the API's
`/metrics` (api/routers/metrics.py) reads them back as counters and histograms, next to what it
reads live (queue depths, jobs queued and running, worker heartbeats).

- `metrics:ended`     field `variant|status|code` → jobs that ended so
- `metrics:submitted` field `variant` → jobs accepted by the API
- `metrics:tokens`    field `variant|input` / `variant|output` → tokens used
- `metrics:hist:NAME` fields `variant|i` (observations in bucket i, not cumulative; i = len(bounds)
  is +Inf), `variant|sum`, `variant|count`
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from core.events import add_status
from core.settings import Settings

SEP = "|"  # variant names are [a-z0-9.-]; statuses and codes are words


@dataclass(frozen=True)
class Histogram:
    name: str  # the Prometheus name
    help: str
    field: str  # the job_metrics value it observes
    scale: float  # multiplies the value into the histogram's unit
    bounds: tuple[float, ...]


HISTOGRAMS = (
    Histogram(
        "gemmaq_job_duration_seconds",
        "From submission to the end of the job (queue wait + load + inference).",
        "total_ms",
        1e-3,
        (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
    ),
    Histogram(
        "gemmaq_queue_wait_seconds",
        "From submission until a worker took the job.",
        "queue_ms",
        1e-3,
        (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    ),
    Histogram(
        "gemmaq_time_to_first_token_seconds",
        "From the job's start on the worker to its first generated token.",
        "time_to_first_token_ms",
        1e-3,
        (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    ),
    Histogram(
        "gemmaq_job_tokens_per_second",
        "Each job's output tokens over its inference time.",
        "tokens_per_second",
        1.0,
        (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500),
    ),
    Histogram(
        "gemmaq_batch_size",
        "The largest batch each job ran in.",
        "batch_size",
        1.0,
        (1, 2, 4, 8, 16, 32, 64, 128, 256),
    ),
)


@dataclass(frozen=True)
class Ended:
    """A job that has just reached a terminal state (counted once, where that happened)."""

    job_id: str
    variant: str
    status: str
    code: str | None = None
    metrics: Mapping[str, Any] | None = None  # its attempt's job_metrics values, when it ran


class Pipe(Protocol):
    """What `add_ended` needs of a Redis pipeline (sync or asyncio: commands only queue)."""

    def hincrby(self, name: str, key: str, amount: int = 1) -> Any: ...

    def hincrbyfloat(self, name: str, key: str, amount: float = 1.0) -> Any: ...

    def xadd(self, name: str, fields: Any, *, maxlen: int | None = ..., approximate: bool = ...) -> Any: ...

    def expire(self, name: str, time: int) -> Any: ...


def ended_key(settings: Settings) -> str:
    return settings.key("metrics", "ended")


def submitted_key(settings: Settings) -> str:
    return settings.key("metrics", "submitted")


def tokens_key(settings: Settings) -> str:
    return settings.key("metrics", "tokens")


def histogram_key(settings: Settings, histogram: Histogram) -> str:
    return settings.key("metrics", "hist", histogram.name)


def record_ended(pipe: Pipe, settings: Settings, jobs: Sequence[Ended]) -> None:
    """Queue on `pipe` (the caller executes it) what follows each job's move to its terminal
    state: its terminal event (core/events.py) and its counts for /metrics."""
    for job in jobs:
        add_status(pipe, settings, job.job_id, job.status)
        pipe.hincrby(ended_key(settings), SEP.join((job.variant, job.status, job.code or "")), 1)
        metrics = job.metrics or {}
        for kind in ("input", "output"):
            if tokens := metrics.get(f"{kind}_tokens"):
                pipe.hincrby(tokens_key(settings), f"{job.variant}{SEP}{kind}", int(tokens))
        for histogram in HISTOGRAMS:
            value = metrics.get(histogram.field)
            if value is None:
                continue
            value = float(value) * histogram.scale
            key = histogram_key(settings, histogram)
            bucket = bisect.bisect_left(histogram.bounds, value)  # first bound ≥ value
            pipe.hincrby(key, f"{job.variant}{SEP}{bucket}", 1)
            pipe.hincrbyfloat(key, f"{job.variant}{SEP}sum", value)
            pipe.hincrby(key, f"{job.variant}{SEP}count", 1)


def split(field: bytes | str) -> list[str]:
    return (field.decode() if isinstance(field, bytes) else field).split(SEP)
