"""Names that cross process boundaries: Celery task and queue names, Redis keys."""

from __future__ import annotations

from core.settings import Settings

RUN_JOB_TASK = "gemmaq.run_job"


def variant_queue(variant: str) -> str:
    return f"variant.{variant}"


def job_done_channel(settings: Settings, job_id: str) -> str:
    """Pub/sub channel a worker publishes to when a job reaches a terminal state."""
    return settings.key("job-done", job_id)


def cancel_key(settings: Settings, job_id: str) -> str:
    """Set while a running job is asked to stop, to the time it was asked (epoch seconds);
    the generation loop checks it between decoding steps."""
    return settings.key("cancel", job_id)


def cancel_channel(settings: Settings) -> str:
    """Pub/sub channel the API announces a running job's cancel on (its id), so a worker's shell
    passes it to the engine at once instead of at its next poll of the flags."""
    return settings.key("cancels")


def cancel_requested_at(value: bytes | str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return 0.0  # set by something else: stop at once


def worker_key(settings: Settings, worker: str) -> str:
    return settings.key("worker", worker)


def worker_pattern(settings: Settings) -> str:
    return settings.key("worker", "*")


def lease_key(settings: Settings, job_id: str) -> str:
    """Held by the worker running the job, renewed by its heartbeat; gone → the job is orphaned."""
    return settings.key("lease", job_id)


def message_key(settings: Settings, job_id: str) -> str:
    """Set when the job's message is sent, cleared when a worker claims it: a queued job without
    one has no message in the broker (lost between commit and send, or with a restarted Redis)."""
    return settings.key("message", job_id)


def key_epoch_key(settings: Settings) -> str:
    """A random value that API processes check their in-memory key cache against (api/auth.py);
    revoking a key or changing a quota writes a new one."""
    return settings.key("auth", "epoch")
