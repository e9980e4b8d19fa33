"""One typed settings object, built on demand from ``GEMMAQ_*`` variables, never at import."""

from __future__ import annotations

import functools
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.scheduling import DEFAULT_MAX_PRIORITY


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "gemmaq"


def _default_model_cache() -> Path:
    return Path.home() / ".cache" / "gemmaq" / "models"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GEMMAQ_", env_nested_delimiter="__", extra="ignore")

    # None → `gemmaq dev` starts embedded servers; other commands require them.
    database_url: str | None = None
    redis_url: str | None = None
    # Prefix of every Redis key gemmaq and its broker write; lets runs share one Redis.
    namespace: str = "gemmaq"

    variants_file: Path | None = Field(default=None, description="TOML file of variants; None → built in")
    moderation_policy: Path | None = Field(
        default=None, description="TOML moderation policy (core/moderation.py); None → core/moderation.toml"
    )
    default_variant: str = "gemma-3-270m"
    model_cache: Path = Field(default_factory=_default_model_cache)
    data_dir: Path = Field(default_factory=_default_data_dir)

    # Broker: redelivery after this many seconds without an ack; above the longest job.
    visibility_timeout_s: int = 3600
    max_wait_s: float = 60.0
    worker_heartbeat_s: float = 5.0
    # Memory a worker fills with warm variants (MiB); None → 90% of the GPU's memory, or half
    # the host's RAM on CPU. Least recently used variants are evicted to load others.
    worker_memory_mb: int | None = Field(default=None, ge=1)
    # Every continuous variant's paged KV cache, in MiB (None: each variant's own kv_cache_mb).
    kv_cache_mb: int | None = Field(default=None, ge=1)
    # Torch threads of a worker's engine process (workers.engine), set once at its start;
    # None: one per core.
    engine_threads: int | None = Field(default=None, ge=1)
    # Attempts a job gets when its worker dies under it; then it ends failed.
    max_attempts: int = 3
    # A running job's lease: renewed by its worker's heartbeat; a job whose lease stays gone
    # this long is requeued by the reconciler (or failed after max_attempts).
    lease_s: float = 15.0
    reconcile_interval_s: float = 2.0
    # Touched while a worker or reconciler is alive and reaching its stores (core.liveness);
    # `gemmaq healthy` checks its age. None: not kept (outside containers).
    health_file: Path | None = None
    # A queued job whose broker message is missing this long after commit is enqueued again.
    enqueue_grace_s: float = 10.0
    # SIGTERM: the batch in hand gets this long to finish before the worker exits anyway.
    shutdown_grace_s: float = 60.0
    # Test-only fault injection points (see core/faults.py); never set in a deployment.
    faults: list[str] = Field(default_factory=list)

    # Media limits, checked at the API before anything reaches a worker.
    media_max_image_bytes: int = 20 * 1024 * 1024
    media_max_image_pixels: int = 25_000_000
    media_max_audio_bytes: int = 25 * 1024 * 1024
    media_max_audio_seconds: float = 30.0
    media_max_parts: int = 8
    # On the worker: images are decoded no larger than this on their longer side, and a worker
    # holds at most `worker_media_mb` of decoded media (the jobs in hand together).
    media_decode_max_side: int = Field(default=1792, ge=64)
    worker_media_mb: int = Field(default=1024, ge=16)
    files_max_bytes: int = 100 * 1024 * 1024
    # LoRA adapters (POST /v1/adapters): the uploaded archive, and its contents unpacked, at most
    # this many bytes; the highest rank (`r`) taken.
    adapters_max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    adapters_max_rank: int = Field(default=64, ge=1, le=1024)
    # Any other request body (a job with inline base64 media included).
    max_request_bytes: int = 64 * 1024 * 1024

    # Quotas a new user starts with (editable per user afterwards, no restart needed).
    quota_requests_per_minute: int = 600
    quota_tokens_per_day: int = 10_000_000
    quota_max_concurrent_jobs: int = 64
    quota_max_input_bytes: int = 20 * 1024 * 1024
    quota_max_storage_bytes: int = 2 * 1024 * 1024 * 1024  # files a user keeps (POST /v1/files)
    quota_max_files: int = 1000
    # The highest priority a user's jobs reach among other users' (core/scheduling.py); above it,
    # `priority` only orders the user's own jobs. An operator grants more per user.
    quota_max_priority: int = Field(default=DEFAULT_MAX_PRIORITY, ge=0, le=9)
    # Files expire this long after upload unless `expires_after` says otherwise (None: never).
    files_retention_s: int | None = Field(default=30 * 86_400, ge=3600)
    # A job's `expires_at` may lie at most this far ahead (every timestamp a tenant sends is bounded).
    job_expires_max_s: int = Field(default=30 * 86_400, ge=60)
    # Failed authentications one client address may make in a minute; past them it gets 429
    # until the minute is over, before its keys cost a database query.
    auth_failures_per_minute: int = Field(default=60, ge=1)
    # A user's submissions in their costly checks (a grammar's compile, a webhook's DNS lookup,
    # inline media decoded) at once, in each API process; the others wait their turn.
    checks_per_user: int = Field(default=2, ge=1)
    # Device loads one user's jobs may make in an hour (a job for a variant that is not warm on
    # its worker loads it, and no batch runs meanwhile); past them, such a job waits in the queue.
    loads_per_user_per_hour: int = Field(default=20, ge=1)

    # /v1/metrics/summary raises an alert past each of these.
    alert_max_latency_s: float = Field(default=10.0, gt=0, description="p95 job latency")
    alert_max_memory_mb: float = Field(default=8192.0, gt=0, description="mean peak device memory per job")
    alert_min_tokens_per_second: float = Field(default=5.0, ge=0, description="mean per-job decode rate")
    alert_min_success_rate: float = Field(default=0.95, ge=0, le=1)

    # POST /v1/chat/completions waits this long for its job (then 504; the job goes on).
    chat_wait_s: float = Field(default=600.0, gt=0)
    # api/holds.py: open streams and held waits per user, in each API process; Redis
    # connections each API process keeps (streams take at most half of them).
    max_streams_per_user: int = Field(default=16, ge=1)
    max_waits_per_user: int = Field(default=256, ge=1)
    redis_max_connections: int = Field(default=100, ge=8)
    # A job's events (status changes, text deltas: core/events.py) are kept this long after the latest.
    events_ttl_s: int = Field(default=3600, ge=1)

    # Webhooks (core/webhooks.py): targets on private, loopback or link-local addresses are
    # refused unless this list names them (hostnames, IP addresses or CIDR blocks).
    webhook_allow_hosts: list[str] = Field(default_factory=list)
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    webhook_max_attempts: int = Field(default=8, ge=1, le=50)
    webhook_backoff_s: float = Field(default=5.0, gt=0, description="before the 2nd attempt; doubles after")
    webhook_backoff_max_s: float = Field(default=3600.0, gt=0)
    webhook_interval_s: float = Field(default=1.0, gt=0, description="how often deliveries are looked for")
    webhook_max_pending: int = Field(
        default=1000, ge=1, description="a user's pending deliveries; new ones past it fail at once"
    )

    api_host: str = "127.0.0.1"
    # GET /metrics asks for this bearer token when set (empty: open, as Prometheus scrapes it).
    metrics_token: str | None = None
    api_port: int = 8000
    log_level: str = "INFO"
    log_json: bool = True

    @field_validator(
        "database_url",
        "redis_url",
        "variants_file",
        "moderation_policy",
        "worker_memory_mb",
        "kv_cache_mb",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def db_url(self) -> str:
        if not self.database_url:
            raise RuntimeError("GEMMAQ_DATABASE_URL is not set (use `gemmaq dev` for embedded servers)")
        return sqlalchemy_url(self.database_url)

    @property
    def broker_url(self) -> str:
        if not self.redis_url:
            raise RuntimeError("GEMMAQ_REDIS_URL is not set (use `gemmaq dev` for embedded servers)")
        return self.redis_url

    def key(self, *parts: str) -> str:
        """A namespaced Redis key."""
        return ":".join((self.namespace, *parts))


def sqlalchemy_url(url: str) -> str:
    """Use psycopg 3 for a plain ``postgresql://`` URL (one driver, sync and async). libpq's
    multi-host form (``postgresql://user@h1:5432,h2:5432/db?target_session_attrs=read-write``,
    as psql and psycopg take it), which SQLAlchemy's URL parser refuses, becomes the form it
    takes: ``…@/db?host=h1:5432&host=h2:5432&target_session_attrs=read-write``."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            url = "postgresql+psycopg://" + url[len(prefix) :]
    scheme, sep, rest = url.partition("://")
    netloc, _, tail = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    if not sep or "," not in hosts:
        return url
    path, _, query = tail.partition("?")
    params = [f"host={host}" for host in hosts.split(",") if host]
    return f"{scheme}://{userinfo}{at}/{path}?{'&'.join([*params, query] if query else params)}"


@functools.cache
def get_settings() -> Settings:
    return Settings()
