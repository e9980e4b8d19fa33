"""The Prometheus exposition of `GET /metrics`, for the whole deployment from one scrape target.

Counters and histograms of ended jobs come from Redis, where every process adds to them
(core/metrics.py); gauges are read at scrape time: broker queue depths (Redis), jobs queued and
running and the oldest queued job's age (PostgreSQL, partial indexes), and each live worker's
heartbeat (warm variants, device memory — GPU memory on a CUDA worker). Built with
prometheus_client's metric families and exposition.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from api.fleet import live_workers, queue_depths
from core import keys, metrics
from core.schemas import ACTIVE_STATUSES
from core.settings import Settings
from db.repo import metrics as metrics_repo
from db.repo.metrics import Pending

CONTENT_TYPE = CONTENT_TYPE_LATEST
MB = 2**20


async def exposition(
    *, redis: Redis, autocommit: AsyncEngine, settings: Settings, variants: list[str]
) -> bytes:
    """Every metric family, read now, in Prometheus text format."""
    stored = await _stored(redis, settings)
    depths = await queue_depths(redis, settings, variants)
    workers = await live_workers(redis, settings)
    async with autocommit.connect() as connection:
        pending = await metrics_repo.pending(session=connection)
    families = [
        *_counters(stored),
        *(_histogram(h, stored["hist"][h.name]) for h in metrics.HISTOGRAMS),
        *_queues(variants, depths, pending),
        *_workers(workers),
    ]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return bytes(generate_latest(registry))


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


async def _stored(redis: Redis, settings: Settings) -> dict[str, Any]:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.ended_key(settings))
        pipe.hgetall(keys.submitted_key(settings))
        pipe.hgetall(keys.tokens_key(settings))
        pipe.hgetall(keys.filtered_key(settings))
        for h in metrics.HISTOGRAMS:
            pipe.hgetall(keys.histogram_key(settings, h.name))
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


def _queues(names: list[str], depths: dict[str, int], pending: list[Pending]) -> Iterable[Metric]:
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
    counts = {(p.variant, p.status): (p.count, p.oldest_s) for p in pending}
    for name in names:
        for status in ACTIVE_STATUSES:
            count, age = counts.get((name, status), (0, 0.0))
            jobs.add_metric([name, status], count)
            if status == "queued":
                oldest.add_metric([name], age)
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
