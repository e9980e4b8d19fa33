"""Aggregates over jobs for the metrics routes: the jobs not yet ended (the /metrics gauges) and
the jobs ended in a window (`GET /v1/metrics/summary`). Read-only."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

# Served by the partial indexes on queued and running jobs.
_PENDING = text("""
SELECT variant, status, count(*), EXTRACT(EPOCH FROM now() - min(created_at))
FROM jobs WHERE status IN ('queued', 'running') GROUP BY variant, status
""")

# Jobs that ended in the window, each with its latest attempt's metrics.
_ENDED = text("""
WITH ended AS (
  SELECT j.status, m.total_ms, m.time_to_first_token_ms, m.tokens_per_second, m.input_tokens,
         m.output_tokens, m.peak_memory_bytes
  FROM jobs j
  LEFT JOIN LATERAL (
    SELECT * FROM job_metrics WHERE job_id = j.id ORDER BY attempt DESC LIMIT 1
  ) m ON true
  WHERE j.finished_at >= now() - make_interval(secs => :window)
    AND (CAST(:user_id AS text) IS NULL OR j.user_id = :user_id)
    AND (CAST(:variant AS text) IS NULL OR j.variant = :variant)
)
SELECT
  count(*) FILTER (WHERE status = 'succeeded'),
  count(*) FILTER (WHERE status = 'failed'),
  count(*) FILTER (WHERE status = 'cancelled'),
  count(*) FILTER (WHERE status = 'expired'),
  avg(total_ms) FILTER (WHERE status = 'succeeded'),
  percentile_cont(0.95) WITHIN GROUP (ORDER BY total_ms) FILTER (WHERE status = 'succeeded'),
  avg(time_to_first_token_ms) FILTER (WHERE status = 'succeeded'),
  percentile_cont(0.95) WITHIN GROUP (ORDER BY time_to_first_token_ms) FILTER (WHERE status = 'succeeded'),
  avg(tokens_per_second) FILTER (WHERE status = 'succeeded'),
  coalesce(sum(input_tokens), 0),
  coalesce(sum(output_tokens), 0),
  avg(peak_memory_bytes) FILTER (WHERE status = 'succeeded'),
  max(peak_memory_bytes) FILTER (WHERE status = 'succeeded')
FROM ended
""")


@dataclass(frozen=True)
class Pending:
    """A variant's jobs in one status that has not ended (queued or running)."""

    variant: str
    status: str
    count: int
    oldest_s: float  # the age of the oldest of them


@dataclass(frozen=True)
class EndedJobs:
    """The jobs that ended in a window: counts by status; latencies, rates and memory peaks over
    the succeeded ones (None when none succeeded); tokens over all of them."""

    succeeded: int
    failed: int
    cancelled: int
    expired: int
    total_ms_mean: float | None
    total_ms_p95: float | None
    first_token_ms_mean: float | None
    first_token_ms_p95: float | None
    tokens_per_second_mean: float | None
    input_tokens: int
    output_tokens: int
    peak_memory_bytes_mean: float | None
    peak_memory_bytes_max: float | None


async def pending(*, session: AsyncSession | AsyncConnection) -> list[Pending]:
    rows = await session.execute(_PENDING)
    return [Pending(str(v), str(s), int(n), float(age or 0)) for v, s, n, age in rows]


async def ended_jobs(
    *, session: AsyncSession | AsyncConnection, window_s: int, user_id: str | None, variant: str | None
) -> EndedJobs:
    """The jobs that ended in the last `window_s` seconds: the user's (every user's with None),
    of the variant (every variant's with None)."""
    params = {"window": window_s, "user_id": user_id, "variant": variant}
    row = (await session.execute(_ENDED, params)).one()
    ok, failed, cancelled, expired = (int(n) for n in row[:4])
    mean_ms, p95_ms, ttft_mean, ttft_p95, tps, tokens_in, tokens_out, mem_mean, mem_max = (
        None if v is None else float(v) for v in row[4:]
    )
    return EndedJobs(
        succeeded=ok, failed=failed, cancelled=cancelled, expired=expired,
        total_ms_mean=mean_ms, total_ms_p95=p95_ms,
        first_token_ms_mean=ttft_mean, first_token_ms_p95=ttft_p95,
        tokens_per_second_mean=tps, input_tokens=int(tokens_in or 0), output_tokens=int(tokens_out or 0),
        peak_memory_bytes_mean=mem_mean, peak_memory_bytes_max=mem_max,
    )  # fmt: skip
