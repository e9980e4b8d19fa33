"""Every Redis key and channel gemmaq uses, under the settings' namespace (`Settings.key`), so
several deployments (or test runs) can share one Redis. Whoever reads or writes a key builds its
name here.

Per job: `message:{job}` (its broker message was sent), `lease:{job}` (the worker running it),
`cancel:{job}` (asked to stop), `events:{job}` (its event stream), `job-done:{job}` (channel).
Per user: `quota:{user}:rate|batch-rate|active|tokens:{day}` (core/quotas.py tells their shape).
Per worker: `worker:{name}` (its heartbeat). Shared: `cancels` (channel), `auth:epoch`,
`duties:lock`, `metrics:*` (core/metrics.py), and the broker's queue lists `variant.{name}[:step]`.
"""

from __future__ import annotations

from datetime import date

from core.scheduling import BROKER_STEPS
from core.settings import Settings

# ---- per job -------------------------------------------------------------------------------


def message_key(settings: Settings, job_id: str) -> str:
    """Set when the job's message is sent, cleared when a worker claims it: a queued job without
    one has no message in the broker (lost between commit and send, or with a restarted Redis)."""
    return settings.key("message", job_id)


def lease_key(settings: Settings, job_id: str) -> str:
    """Held by the worker running the job, renewed by its heartbeat; gone → the job is orphaned."""
    return settings.key("lease", job_id)


def cancel_key(settings: Settings, job_id: str) -> str:
    """Set while a running job is asked to stop, to the time it was asked (epoch seconds);
    the generation loop checks it between decoding steps."""
    return settings.key("cancel", job_id)


def events_key(settings: Settings, job_id: str) -> str:
    """The job's event stream (core/events.py)."""
    return settings.key("events", job_id)


def job_done_channel(settings: Settings, job_id: str) -> str:
    """Pub/sub channel a job's end is published on."""
    return settings.key("job-done", job_id)


def cancel_channel(settings: Settings) -> str:
    """Pub/sub channel the API announces a running job's cancel on (its id), so a worker's shell
    passes it to the engine at once instead of at its next poll of the flags."""
    return settings.key("cancels")


# ---- per user ------------------------------------------------------------------------------


class QuotaKeys:
    """A user's quota keys (core/quotas.py tells what each holds)."""

    def __init__(self, settings: Settings, user_id: str) -> None:
        self.rate = settings.key("quota", user_id, "rate")
        self.batch_rate = settings.key("quota", user_id, "batch-rate")  # batch lines: not per minute
        self.active = settings.key("quota", user_id, "active")
        self._tokens = settings.key("quota", user_id, "tokens")
        self.loads = settings.key("quota", user_id, "loads")  # device loads the user's jobs made

    def tokens(self, day: date) -> str:
        return f"{self._tokens}:{day.isoformat()}"


def active_pattern(settings: Settings) -> str:
    """Every user's `active` hash (a SCAN pattern); `user_of_active` reads the user back."""
    return settings.key("quota", "*", "active")


def user_of_active(key: bytes | str) -> str:
    return (key.decode() if isinstance(key, bytes) else key).split(":")[-2]


# ---- workers, duties, auth -----------------------------------------------------------------


def worker_key(settings: Settings, worker: str) -> str:
    return settings.key("worker", worker)


def worker_pattern(settings: Settings) -> str:
    return settings.key("worker", "*")


def duties_key(settings: Settings) -> str:
    """The lock that one process holds while it runs the reconciler and the webhook dispatcher."""
    return settings.key("duties", "lock")


def key_epoch_key(settings: Settings) -> str:
    """A random value that API processes check their in-memory key cache against (api/auth.py);
    creating or revoking a key or changing a quota writes a new one."""
    return settings.key("auth", "epoch")


def auth_failures_key(settings: Settings, address: str) -> str:
    """Failed authentications from one client address in the current window (api/auth.py)."""
    return settings.key("auth", "failures", address)


# ---- /metrics counters (core/metrics.py) ---------------------------------------------------


def ended_key(settings: Settings) -> str:
    return settings.key("metrics", "ended")


def submitted_key(settings: Settings) -> str:
    return settings.key("metrics", "submitted")


def tokens_key(settings: Settings) -> str:
    return settings.key("metrics", "tokens")


def histogram_key(settings: Settings, name: str) -> str:
    return settings.key("metrics", "hist", name)


def filtered_key(settings: Settings, hour: int | None = None) -> str:
    """All-time refusals by stage and category; or one hour's by user and stage (`hour`: hours
    since the epoch), read back by /v1/metrics/summary."""
    if hour is None:
        return settings.key("metrics", "filtered")
    return settings.key("metrics", "filtered", str(hour))


# ---- the broker's queues -------------------------------------------------------------------


def variant_queue(variant: str) -> str:
    """The Celery queue of a variant's jobs (its Redis lists: `queue_keys`)."""
    return f"variant.{variant}"


def queue_keys(settings: Settings, variant: str) -> list[str]:
    """The Redis lists kombu keeps for one variant's queue, one per priority step."""
    queue = variant_queue(variant)
    return [settings.key(queue) if step == 0 else settings.key(queue, str(step)) for step in BROKER_STEPS]
