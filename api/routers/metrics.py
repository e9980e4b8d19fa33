"""`GET /metrics`: Prometheus text format, for the whole deployment from one scrape target;
`GET /v1/metrics/summary`: the seed tutorial's summary and alerts over the stored job metrics.

Counters and histograms of ended jobs come from Redis, where every process adds to them
(core/metrics.py); gauges are read at scrape time: broker queue depths (Redis), jobs queued and
running and the oldest queued job's age (PostgreSQL, partial indexes), and each live worker's
heartbeat (warm variants, device memory — GPU memory on a CUDA worker). Built with
prometheus_client's metric families and exposition.
"""

from __future__ import annotations

import math
import secrets
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from pydantic import BaseModel, Field
from redis.asyncio import Redis
from sqlalchemy import text

from api.deps import AutocommitDep, RedisDep, SettingsDep, UserDep, VariantsDep
from api.errors import responses
from api.fleet import live_workers, queue_depths
from core import metrics
from core.errors import Unauthorized, UnknownVariant, ValidationFailed
from core.settings import Settings

router = APIRouter(tags=["health"])

MB = 2**20

_PENDING = text("""
SELECT variant, status, count(*), EXTRACT(EPOCH FROM now() - min(created_at))
FROM jobs WHERE status IN ('queued', 'running') GROUP BY variant, status
""")


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"},
        **responses(401),
    },
)
async def prometheus_metrics(
    request: Request, redis: RedisDep, autocommit: AutocommitDep, settings: SettingsDep, variants: VariantsDep
) -> Response:
    """With `GEMMAQ_METRICS_TOKEN` set, only for a scraper that sends it as a bearer token."""
    if settings.metrics_token:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip(), settings.metrics_token):
            raise Unauthorized("/metrics: send `Authorization: Bearer <GEMMAQ_METRICS_TOKEN>`")
    names = variants.names()
    stored = await _stored(redis, settings)
    depths = await queue_depths(redis, settings, names)
    workers = await live_workers(redis, settings)
    async with autocommit.connect() as connection:
        pending = [tuple(row) for row in await connection.execute(_PENDING)]
    families = [
        *_counters(stored),
        *(_histogram(h, stored["hist"][h.name]) for h in metrics.HISTOGRAMS),
        *_queues(names, depths, pending),
        *_workers(workers),
    ]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


async def _stored(redis: Redis, settings: Settings) -> dict[str, Any]:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(metrics.ended_key(settings))
        pipe.hgetall(metrics.submitted_key(settings))
        pipe.hgetall(metrics.tokens_key(settings))
        pipe.hgetall(metrics.filtered_key(settings))
        for h in metrics.HISTOGRAMS:
            pipe.hgetall(metrics.histogram_key(settings, h))
        ended, submitted, tokens, filtered, *hists = await pipe.execute()
    return {
        "ended": ended,
        "submitted": submitted,
        "tokens": tokens,
        "filtered": filtered,
        "hist": {h.name: raw for h, raw in zip(metrics.HISTOGRAMS, hists, strict=True)},
    }


def _counters(stored: dict[str, Any]) -> Iterable[Metric]:
    submitted = CounterMetricFamily(
        "gemmaq_jobs_submitted", "Jobs accepted by the API (POST /v1/jobs).", labels=["variant"]
    )
    for field, value in stored["submitted"].items():
        submitted.add_metric(metrics.split(field), float(value))
    ended = CounterMetricFamily(
        "gemmaq_jobs_ended",
        "Jobs that reached a terminal state, by status and error code ('' when none).",
        labels=["variant", "status", "code"],
    )
    for field, value in stored["ended"].items():
        ended.add_metric(metrics.split(field), float(value))
    tokens = CounterMetricFamily(
        "gemmaq_tokens", "Tokens of ended jobs: kind is input or output.", labels=["variant", "kind"]
    )
    for field, value in stored["tokens"].items():
        tokens.add_metric(metrics.split(field), float(value))
    filtered = CounterMetricFamily(
        "gemmaq_content_filtered",
        "The content filter: inputs refused (stage input) and outputs withheld (stage output), by category.",
        labels=["stage", "category"],
    )
    for field, value in stored["filtered"].items():
        filtered.add_metric(metrics.split(field), float(value))
    return submitted, ended, tokens, filtered


def _histogram(histogram: metrics.Histogram, raw: dict[bytes, bytes]) -> Metric:
    per_variant: dict[str, dict[str, float]] = defaultdict(dict)
    for field, value in raw.items():
        variant, part = metrics.split(field)
        per_variant[variant][part] = float(value)
    family = HistogramMetricFamily(histogram.name, histogram.help, labels=["variant"])
    edges = [*(str(float(b)) for b in histogram.bounds), "+Inf"]
    for variant, parts in sorted(per_variant.items()):
        cumulative, buckets = 0.0, []
        for i, edge in enumerate(edges):
            cumulative += parts.get(str(i), 0.0)
            buckets.append((edge, cumulative))
        family.add_metric([variant], buckets, sum_value=parts.get("sum", 0.0))
    return family


def _queues(names: list[str], depths: dict[str, int], pending: list[tuple[Any, ...]]) -> Iterable[Metric]:
    depth = GaugeMetricFamily(
        "gemmaq_queue_depth", "Messages waiting in the variant's broker queue.", labels=["variant"]
    )
    for name in names:
        depth.add_metric([name], depths.get(name, 0))
    jobs = GaugeMetricFamily(
        "gemmaq_jobs", "Jobs not yet ended, by status (queued, running).", labels=["variant", "status"]
    )
    oldest = GaugeMetricFamily(
        "gemmaq_oldest_queued_seconds", "Age of the variant's oldest queued job.", labels=["variant"]
    )
    counts = {(variant, status): (count, age) for variant, status, count, age in pending}
    for name in names:
        for status in ("queued", "running"):
            count, age = counts.get((name, status), (0, None))
            jobs.add_metric([name, status], count)
            if status == "queued":
                oldest.add_metric([name], float(age or 0))
    return depth, jobs, oldest


def _workers(workers: list[dict[str, Any]]) -> Iterable[Metric]:
    up = GaugeMetricFamily(
        "gemmaq_worker_up", "1 for each worker whose heartbeat is live.", labels=["worker", "device"]
    )
    warm = GaugeMetricFamily(
        "gemmaq_variant_warm",
        "1 when the variant is resident on the worker, 0 when served but not loaded.",
        labels=["worker", "variant", "state"],
    )
    device_memory = GaugeMetricFamily(
        "gemmaq_worker_device_memory_bytes",
        "Memory allocated on the worker's device (GPU memory on a CUDA worker).",
        labels=["worker", "device"],
    )
    budget = GaugeMetricFamily(
        "gemmaq_worker_memory_budget_bytes", "The worker's budget for warm variants.", labels=["worker"]
    )
    used = GaugeMetricFamily(
        "gemmaq_worker_memory_used_bytes", "What the worker's warm variants take.", labels=["worker"]
    )
    age = GaugeMetricFamily(
        "gemmaq_worker_heartbeat_age_seconds", "Seconds since the worker's last heartbeat.", labels=["worker"]
    )
    now = time.time()
    for w in sorted(workers, key=lambda w: str(w.get("worker"))):
        name, device = str(w.get("worker")), str(w.get("device"))
        up.add_metric([name, device], 1)
        for variant, report in sorted(w.get("variants", {}).items()):
            state = str(report.get("state"))
            warm.add_metric([name, variant, state], 1 if state == "warm" else 0)
        if w.get("memory_bytes") is not None:
            device_memory.add_metric([name, device], float(w["memory_bytes"]))
        if w.get("memory_budget_mb") is not None:
            budget.add_metric([name], float(w["memory_budget_mb"]) * MB)
        if w.get("memory_used_mb") is not None:
            used.add_metric([name], float(w["memory_used_mb"]) * MB)
        if w.get("at") is not None:
            age.add_metric([name], max(0.0, now - float(w["at"])))
    return up, warm, device_memory, budget, used, age


# ---- /v1/metrics/summary --------------------------------------------------------------------

WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_WINDOW_S = 31 * 86400

# Jobs that ended in the window, each with its latest attempt's metrics.
_SUMMARY = text("""
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


class JobCounts(BaseModel):
    total: int
    succeeded: int
    failed: int
    cancelled: int
    expired: int


class Spread(BaseModel):
    mean: float | None
    p95: float | None


class PeakMemory(BaseModel):
    mean: float | None
    max: float | None


class Filtered(BaseModel):
    input: int = Field(description="submissions refused CONTENT_FILTERED")
    output: int = Field(description="jobs whose output was withheld (RESPONSE_FILTERED)")


class Alert(BaseModel):
    metric: Literal["latency_p95_ms", "peak_memory_mb", "tokens_per_second", "success_rate"]
    severity: Literal["low", "medium", "high"]
    value: float
    threshold: float
    message: str


class Summary(BaseModel):
    """Over the jobs that ended in the window: the caller's own, or every user's for an admin."""

    scope: Literal["user", "all"]
    variant: str | None
    window_s: int
    jobs: JobCounts
    success_rate: float | None = Field(
        description="succeeded / (succeeded + failed + expired); cancelled jobs are left out"
    )
    latency_ms: Spread = Field(description="submission to end, succeeded jobs")
    time_to_first_token_ms: Spread
    tokens_per_second: float | None = Field(description="mean per-job decode rate, succeeded jobs")
    input_tokens: int
    output_tokens: int
    peak_memory_mb: PeakMemory = Field(description="device memory peaks of succeeded jobs")
    filtered: Filtered = Field(description="the content filter's refusals, counted by the hour")
    alerts: list[Alert]


def parse_window(window: str) -> int:
    unit = window[-1:]
    if unit.isdigit():
        unit, window = "s", window + "s"
    if unit not in WINDOW_UNITS or not window[:-1].isdigit():
        raise ValidationFailed("window: a number and a unit s, m, h or d (e.g. 15m, 24h)", {"window": window})
    seconds = int(window[:-1]) * WINDOW_UNITS[unit]
    if not 0 < seconds <= MAX_WINDOW_S:
        raise ValidationFailed("window: more than 0 and at most 31d", {"window": window})
    return seconds


@router.get(
    "/v1/metrics/summary",
    responses=responses(401, 422, 503),
    summary="Success rate, latency, tokens/s and alerts over a window",
    tags=["metrics"],
)
async def metrics_summary(
    user: UserDep,
    autocommit: AutocommitDep,
    redis: RedisDep,
    settings: SettingsDep,
    variants: VariantsDep,
    variant: Annotated[str | None, Query(max_length=100, description="one variant; all when absent")] = None,
    window: Annotated[str, Query(max_length=12, description="e.g. 15m, 1h, 24h, 7d")] = "1h",
) -> Summary:
    if variant is not None and variant not in variants:
        raise UnknownVariant(
            f"unknown variant {variant!r}", {"variant": variant, "variants": variants.names()}
        )
    seconds = parse_window(window)
    params = {"window": seconds, "user_id": None if user.is_admin else user.id, "variant": variant}
    async with autocommit.connect() as connection:
        row = (await connection.execute(_SUMMARY, params)).one()
    ok, failed, cancelled, expired = (int(n) for n in row[:4])
    mean_ms, p95_ms, ttft_mean, ttft_p95, tps, tokens_in, tokens_out, mem_mean, mem_max = (
        None if v is None else float(v) for v in row[4:]
    )
    judged = ok + failed + expired
    summary = Summary(
        scope="all" if user.is_admin else "user",
        variant=variant,
        window_s=seconds,
        jobs=JobCounts(
            total=ok + failed + cancelled + expired,
            succeeded=ok,
            failed=failed,
            cancelled=cancelled,
            expired=expired,
        ),
        success_rate=ok / judged if judged else None,
        latency_ms=Spread(mean=mean_ms, p95=p95_ms),
        time_to_first_token_ms=Spread(mean=ttft_mean, p95=ttft_p95),
        tokens_per_second=tps,
        input_tokens=int(tokens_in or 0),
        output_tokens=int(tokens_out or 0),
        peak_memory_mb=PeakMemory(
            mean=mem_mean / MB if mem_mean is not None else None,
            max=mem_max / MB if mem_max is not None else None,
        ),
        filtered=await _filtered(redis, settings, seconds, None if user.is_admin else user.id),
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
            pipe.hgetall(metrics.filtered_key(settings, hour))
        buckets = await pipe.execute()
    counts = {"input": 0, "output": 0}
    for bucket in buckets:
        for field, value in bucket.items():
            owner, stage = metrics.split(field)
            if stage in counts and (user_id is None or owner == user_id):
                counts[stage] += int(value)
    return Filtered(**counts)


def alerts_for(s: Summary, settings: Settings) -> list[Alert]:
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
