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
    """Set while a running job is asked to stop; the generation loop checks it between steps."""
    return settings.key("cancel", job_id)


def worker_key(settings: Settings, worker: str) -> str:
    return settings.key("worker", worker)


def worker_pattern(settings: Settings) -> str:
    return settings.key("worker", "*")
