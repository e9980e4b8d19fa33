"""The summary of `GET /v1/metrics/summary`: success rate, latency, decode rate, tokens and memory
peaks over the jobs that ended in a window, the content filter's refusals, and the alerts raised
when one of them is past its threshold (`alert_*` in the settings)."""

from __future__ import annotations

import math
import time

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from api.schemas import Alert, Filtered, JobCounts, PeakMemory, Spread, Summary
from core import keys, metrics
from core.errors import ValidationFailed
from core.settings import Settings
from db.repo import metrics as metrics_repo

MB = 2**20
WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_WINDOW_S = 31 * 86400
ASCII_DIGITS = frozenset("0123456789")  # str.isdigit() also takes "²", which int() refuses


def parse_window(window: str) -> int:
    unit = window[-1:]
    if unit in ASCII_DIGITS:
        unit, window = "s", window + "s"
    number = window[:-1]
    if unit not in WINDOW_UNITS or not 0 < len(number) <= 9 or any(c not in ASCII_DIGITS for c in number):
        raise ValidationFailed("window: a number and a unit s, m, h or d (e.g. 15m, 24h)", {"window": window})
    seconds = int(window[:-1]) * WINDOW_UNITS[unit]
    if not 0 < seconds <= MAX_WINDOW_S:
        raise ValidationFailed("window: more than 0 and at most 31d", {"window": window})
    return seconds


async def summarize(
    *,
    autocommit: AsyncEngine,
    redis: Redis,
    settings: Settings,
    window_s: int,
    user_id: str | None,
    variant: str | None,
) -> Summary:
    """Over the jobs that ended in the last `window_s` seconds: the user's (every user's with
    None), of the variant (every variant's with None)."""
    async with autocommit.connect() as connection:
        ended = await metrics_repo.ended_jobs(
            session=connection, window_s=window_s, user_id=user_id, variant=variant
        )
    judged = ended.succeeded + ended.failed + ended.expired
    mem_mean, mem_max = ended.peak_memory_bytes_mean, ended.peak_memory_bytes_max
    summary = Summary(
        scope="all" if user_id is None else "user",
        variant=variant,
        window_s=window_s,
        jobs=JobCounts(
            total=judged + ended.cancelled,
            succeeded=ended.succeeded,
            failed=ended.failed,
            cancelled=ended.cancelled,
            expired=ended.expired,
        ),
        success_rate=ended.succeeded / judged if judged else None,
        latency_ms=Spread(mean=ended.total_ms_mean, p95=ended.total_ms_p95),
        time_to_first_token_ms=Spread(mean=ended.first_token_ms_mean, p95=ended.first_token_ms_p95),
        tokens_per_second=ended.tokens_per_second_mean,
        input_tokens=ended.input_tokens,
        output_tokens=ended.output_tokens,
        peak_memory_mb=PeakMemory(
            mean=mem_mean / MB if mem_mean is not None else None,
            max=mem_max / MB if mem_max is not None else None,
        ),
        filtered=await _filtered(redis, settings, window_s, user_id),
        alerts=[],
    )
    summary.alerts = alerts_for(summary, settings)
    return summary


async def _filtered(redis: Redis, settings: Settings, seconds: int, user_id: str | None) -> Filtered:
    """The content filter's refusals in the hours the window touches (the caller's, or everyone's)."""
    now = int(time.time() // 3600)
    hours = range(now - math.ceil(seconds / 3600), now + 1)
    async with redis.pipeline(transaction=False) as pipe:
        for hour in hours:
            pipe.hgetall(keys.filtered_key(settings, hour))
        buckets = await pipe.execute()
    counts = {"input": 0, "output": 0}
    for bucket in buckets:
        for field, value in bucket.items():
            owner, stage = metrics.split(field)
            if stage in counts and (user_id is None or owner == user_id):
                counts[stage] += int(value)
    return Filtered(**counts)


def alerts_for(s: Summary, settings: Settings) -> list[Alert]:
    """An alert for each measure of the summary past its threshold in the settings."""
    alerts = []
    if s.success_rate is not None and s.success_rate < settings.alert_min_success_rate:
        alerts.append(
            Alert(
                metric="success_rate", severity="high", value=s.success_rate,
                threshold=settings.alert_min_success_rate,
                message=f"success rate {s.success_rate:.1%} is under {settings.alert_min_success_rate:.1%}",
            )
        )  # fmt: skip
    limit_ms = settings.alert_max_latency_s * 1000
    if s.latency_ms.p95 is not None and s.latency_ms.p95 > limit_ms:
        alerts.append(
            Alert(
                metric="latency_p95_ms", severity="medium", value=s.latency_ms.p95, threshold=limit_ms,
                message=f"p95 latency {s.latency_ms.p95 / 1000:.2f} s is over "
                f"{settings.alert_max_latency_s} s",
            )
        )  # fmt: skip
    if s.peak_memory_mb.mean is not None and s.peak_memory_mb.mean > settings.alert_max_memory_mb:
        alerts.append(
            Alert(
                metric="peak_memory_mb", severity="medium", value=s.peak_memory_mb.mean,
                threshold=settings.alert_max_memory_mb,
                message=f"mean peak memory {s.peak_memory_mb.mean:.0f} MB is over "
                f"{settings.alert_max_memory_mb:.0f} MB",
            )
        )  # fmt: skip
    if s.tokens_per_second is not None and s.tokens_per_second < settings.alert_min_tokens_per_second:
        alerts.append(
            Alert(
                metric="tokens_per_second", severity="low", value=s.tokens_per_second,
                threshold=settings.alert_min_tokens_per_second,
                message=f"mean decode rate {s.tokens_per_second:.1f} tokens/s is under "
                f"{settings.alert_min_tokens_per_second} tokens/s",
            )
        )  # fmt: skip
    return alerts
