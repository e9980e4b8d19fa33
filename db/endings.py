"""A job's end: every way a job ends — its worker finishes it, the caller cancels it while it is
queued, its deadline passes, its workers are lost on every attempt — goes through `end_jobs`.

`end_jobs` takes `JobEnd`s (how each job is to end) and, in one SQL statement, moves each job
to its terminal status once (only from the state the `JobEnd` names: a redelivered message, a
second worker or a racing reconciler changes nothing), adds its usage to the ledger and writes
its attempt's metrics row. Then, in Redis, `settle` releases each job's concurrency slot and
settles its tokens (idempotent), clears its cancel flag, publishes its done message, appends its
terminal event and adds it to the /metrics counters. What comes back, for each job that this call
ended, is an `Ended`: the one record of a job's end.

A job that had ended before (its worker died before settling, a redelivered message of a
finished job) is settled again through `settle` alone, with `fresh=False`: its slot goes back if
it was still held, and nothing is counted twice.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any, cast

import redis
import structlog
from sqlalchemy import Connection, Engine, Row, Table, select, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from core import events, keys
from core.errors import CANCELLED, EXPIRED
from core.metrics import HISTOGRAMS, RECORD_ENDED, bucket_of
from core.quotas import END
from core.schemas import TERMINAL_STATUSES
from core.settings import Settings
from db.models import Job, JobMetric

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Ended:
    """A job that reached a terminal state: what its end settles, publishes and counts."""

    job_id: str
    user_id: str
    variant: str
    day: date  # the UTC day its tokens count against
    status: str
    code: str | None  # its error's code
    tokens: int  # input + output, settled against the owner's quota
    metrics: Mapping[str, Any] | None = None  # its attempt's job_metrics values, when it ran
    fresh: bool = True  # this call ended it (False: it had ended before and is only settled again)


@dataclass(frozen=True)
class JobEnd:
    """How a job is to end. It moves from `running` at `attempt` (its worker's outcome, a lost
    worker), or from `queued` when `attempt` is None — only if `owner` owns it, where given (a
    cancel), and only once its deadline has passed, where `due` (an expiry)."""

    job_id: str
    status: str
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None  # the attempt's job_metrics row (with an attempt only)
    # (input, output) tokens used by an attempt that ended without a result (timed out, failed
    # mid-reply, its engine gone): charged as a result's usage would be
    spent: tuple[int, int] | None = None
    attempt: int | None = None
    owner: str | None = None
    due: bool = False

    def __post_init__(self) -> None:
        assert self.status in TERMINAL_STATUSES, self.status
        assert self.metrics is None or self.attempt is not None, "metrics belong to an attempt"
        assert self.spent is None or self.result is None, "a result carries its own usage"

    @classmethod
    def cancel(cls, job_id: str, owner: str) -> JobEnd:
        """The owner cancels the job while it is queued: it never runs."""
        error = {"code": CANCELLED, "message": "cancelled by the caller before it ran"}
        return cls(job_id, "cancelled", error=error, owner=owner)

    @classmethod
    def expire(cls, job_id: str) -> JobEnd:
        """A queued job past its deadline ends without running."""
        error = {"code": EXPIRED, "message": "its deadline (expires_at) passed while it was queued"}
        return cls(job_id, "expired", error=error, due=True)


def tokens_used(result: Mapping[str, Any] | None) -> tuple[int, int]:
    """A result's (input, output) tokens."""
    usage = (result or {}).get("usage") or {}
    return int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)


def ended_of(job: Job | Row[Any], *, fresh: bool) -> Ended:
    """The end of a job in a terminal state: its row (or a row of `_ENDED_COLUMNS`)."""
    code = (job.error or {}).get("code")
    tokens = sum(tokens_used(job.result))
    return Ended(job.id, job.user_id, job.variant, job.charged_on, job.status, code, tokens, fresh=fresh)


# ---- PostgreSQL ----------------------------------------------------------------------------

_metrics = cast(Table, JobMetric.__table__)
METRIC_COLUMNS = tuple(c.name for c in _metrics.c if c.name not in ("id", "job_id", "attempt", "created_at"))
_PG = postgresql.dialect()  # type: ignore[no-untyped-call]
_RECORD = ", ".join(f"{c} {_metrics.c[c].type.compile(dialect=_PG)}" for c in METRIC_COLUMNS)
# Every job given moves to its terminal status (once: only from the state its JobEnd names), the
# usage they used goes to the ledger and each attempt's metrics row is written — one statement
# (data-modifying CTEs over the ends, passed as one JSON array), so one transaction and one round
# trip for a whole batch of jobs.
_END = text(f"""
WITH v AS (
  SELECT * FROM jsonb_to_recordset(CAST(:ends AS jsonb)) AS v(
    job_id text, attempt integer, owner text, due boolean, status text, result jsonb, error jsonb,
    spent_in bigint, spent_out bigint, metrics_given boolean, {_RECORD})
), done AS (
  UPDATE jobs SET status = v.status, result = v.result, error = v.error, finished_at = now()
  FROM v WHERE jobs.id = v.job_id
    AND jobs.status = CASE WHEN v.attempt IS NULL THEN 'queued' ELSE 'running' END
    AND (v.attempt IS NULL OR jobs.attempts = v.attempt)
    AND (v.owner IS NULL OR jobs.user_id = v.owner)
    AND (NOT v.due OR jobs.expires_at <= now())
  RETURNING jobs.id, jobs.user_id, jobs.charged_on, jobs.variant
), usage AS (
  INSERT INTO usage_ledger AS ledger (user_id, day, input_tokens, output_tokens, jobs)
  SELECT done.user_id, done.charged_on, sum(v.spent_in), sum(v.spent_out), count(*)
  FROM done JOIN v ON v.job_id = done.id
  WHERE v.spent_in + v.spent_out > 0
  GROUP BY done.user_id, done.charged_on
  ON CONFLICT (user_id, day) DO UPDATE SET
    input_tokens = ledger.input_tokens + excluded.input_tokens,
    output_tokens = ledger.output_tokens + excluded.output_tokens,
    jobs = ledger.jobs + excluded.jobs,
    updated_at = now()
), metric AS (
  INSERT INTO job_metrics (job_id, attempt, {", ".join(METRIC_COLUMNS)})
  SELECT v.job_id, v.attempt, {", ".join(f"v.{c}" for c in METRIC_COLUMNS)}
  FROM v JOIN done ON done.id = v.job_id
  WHERE v.attempt IS NOT NULL AND v.metrics_given
  ON CONFLICT ON CONSTRAINT uq_job_metrics_job_attempt DO NOTHING
)
SELECT id, user_id, charged_on, variant FROM done
""")


def _row(end: JobEnd) -> dict[str, Any]:
    spent_in, spent_out = tokens_used(end.result) if end.result is not None else (end.spent or (0, 0))
    row: dict[str, Any] = {
        "job_id": end.job_id,
        "attempt": end.attempt,
        "owner": end.owner,
        "due": end.due,
        "status": end.status,
        "result": end.result,
        "error": end.error,
        "spent_in": spent_in,
        "spent_out": spent_out,
        "metrics_given": end.metrics is not None,
    }
    metrics = end.metrics or {}
    unknown = set(metrics) - set(METRIC_COLUMNS)
    assert not unknown, f"not job_metrics columns: {sorted(unknown)}"
    for column in METRIC_COLUMNS:
        value = metrics.get(column)
        row[column] = None if isinstance(value, float) and not math.isfinite(value) else value
    return row


def write_ends(session: Session | Connection, ends: Sequence[JobEnd]) -> list[Ended | None]:
    """The PostgreSQL half of `end_jobs`, in the caller's transaction: for each end, the job's
    `Ended`, or None when it was not in the state its JobEnd names (it had moved on meanwhile)."""
    if not ends:
        return []
    rows = [_row(end) for end in ends]
    done = {
        job_id: (user_id, day, variant)
        for job_id, user_id, day, variant in session.execute(_END, {"ends": json.dumps(rows)})
    }
    out: list[Ended | None] = []
    for end, row in zip(ends, rows, strict=True):
        moved = done.get(end.job_id)
        if moved is None:
            out.append(None)
            continue
        user_id, day, variant = moved
        code = (end.error or {}).get("code")
        tokens = row["spent_in"] + row["spent_out"]
        out.append(Ended(end.job_id, user_id, variant, day, end.status, code, tokens, end.metrics))
    return out


_ENDED_COLUMNS = (Job.id, Job.user_id, Job.variant, Job.charged_on, Job.status, Job.error, Job.result)


def ended_before(session: Session | Connection, job_id: str) -> Ended | None:
    """The job's end if it has ended (`fresh=False`: to settle again, harmlessly). Columns, not
    the entity: a Connection (what the worker's claim passes) returns rows, not Job objects."""
    row = session.execute(
        select(*_ENDED_COLUMNS).where(Job.id == job_id, Job.status.in_(sorted(TERMINAL_STATUSES)))
    ).one_or_none()
    return ended_of(row, fresh=False) if row is not None else None


# ---- Redis ---------------------------------------------------------------------------------


def _settle_args(settings: Settings, ended: Sequence[Ended]) -> tuple[list[str], list[str | int]]:
    """KEYS and ARGV of core.quotas.END: per job its quota keys, cancel flag and done channel."""
    names: list[str] = []
    args: list[str | int] = []
    for e in ended:
        quota = keys.QuotaKeys(settings, e.user_id)
        names += [quota.active, quota.tokens(e.day), keys.cancel_key(settings, e.job_id)]
        args += [e.job_id, e.tokens, keys.job_done_channel(settings, e.job_id)]
    return names, args


def _record_args(settings: Settings, ended: Sequence[Ended]) -> tuple[list[str], list[str | int | float]]:
    """KEYS and ARGV of core.metrics.RECORD_ENDED: each job's terminal event and its counts."""
    names = [
        keys.ended_key(settings),
        keys.tokens_key(settings),
        *(keys.histogram_key(settings, h.name) for h in HISTOGRAMS),
    ]
    args: list[str | int | float] = [len(HISTOGRAMS), settings.events_ttl_s, events.MAX_ENTRIES, len(ended)]
    for e in ended:
        metrics = e.metrics or {}
        args += [
            e.variant, e.status, e.code or "",
            int(metrics.get("input_tokens") or 0), int(metrics.get("output_tokens") or 0),
        ]  # fmt: skip
        for histogram in HISTOGRAMS:
            args += bucket_of(histogram, metrics.get(histogram.field))
        args.append(events.status_data(e.status))
        names.append(keys.events_key(settings, e.job_id))
    return names, args


def settle(client: redis.Redis, settings: Settings, ended: Sequence[Ended]) -> list[bool]:
    """The Redis half of `end_jobs`: for each job its slot released and its tokens settled (once
    in effect), its cancel flag cleared and its done message published; for those just ended,
    their terminal events and /metrics counts. Two scripts, whatever the number of jobs. Redis
    away: the reconciler's sweep releases the slots, waiters re-read their jobs every few seconds.
    For each job, whether this call released its slot (False: it had been released before)."""
    if not ended:
        return []
    released = [False] * len(ended)
    try:
        names, args = _settle_args(settings, ended)
        released = [int(r) >= 0 for r in client.register_script(END)(keys=names, args=args)]
    except redis.RedisError:
        log.warning("job.settle_failed", job_ids=[e.job_id for e in ended])
    fresh = [e for e in ended if e.fresh]
    if fresh:
        try:
            names, record = _record_args(settings, fresh)
            client.register_script(RECORD_ENDED)(keys=names, args=record)
        except redis.RedisError:
            log.warning("job.events_failed", job_ids=[e.job_id for e in fresh])
    return released


def end_jobs(
    engine: Engine, client: redis.Redis, settings: Settings, ends: Sequence[JobEnd]
) -> list[Ended | None]:
    """End these jobs (see the module's docstring); for each, its `Ended`, or None when it had
    moved on (this call changed nothing for it). The statement is committed before anything is
    published: on an autocommit engine (the workers'), in one round trip."""
    with engine.begin() as connection:
        ended = write_ends(connection, ends)
    settle(client, settings, [e for e in ended if e is not None])
    return ended
