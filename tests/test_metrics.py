"""`/metrics`: Prometheus text that prometheus_client parses, moving as real jobs run; the
Grafana dashboard shipped beside it charts every family it exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.metrics_summary import alerts_for
from api.schemas import Filtered, JobCounts, PeakMemory, Spread, Summary
from core.settings import Settings
from tests.helpers.stack import Stack, wait_job
from tests.helpers.variants import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "gemmaq.json"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(stack: Stack) -> tuple[Samples, set[str]]:
    """Every sample by (name, labels), and the family names (no auth: Prometheus scrapes it)."""
    response = httpx.get(f"{stack.url}/metrics", timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    families = set()
    for family in text_string_to_metric_families(response.text):
        families.add(family.name)
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, families


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.mark.stack
def test_metrics_move_as_jobs_run(stack: Stack, client: httpx.Client) -> None:
    variant = "gemma-3-270m"
    before, _ = scrape(stack)
    ids = []
    for prompt in ("Count: one, two,", "The alphabet: a, b,"):
        body = {"variant": variant, "input": {"prompt": prompt}, "params": {"max_new_tokens": 6}}
        response = client.post("/v1/jobs", json=body)
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    jobs = [wait_job(client, job_id) for job_id in ids]
    assert all(j["status"] == "succeeded" for j in jobs), jobs
    # A job for a variant no worker serves stays queued: the gauges show it, then it is cancelled.
    held = client.post("/v1/jobs", json={"variant": "echo-held", "input": {"prompt": "wait"}}).json()
    during, _ = scrape(stack)
    assert value(during, "gemmaq_jobs", variant="echo-held", status="queued") >= 1
    assert value(during, "gemmaq_queue_depth", variant="echo-held") >= 1
    assert value(during, "gemmaq_oldest_queued_seconds", variant="echo-held") >= 0
    assert client.post(f"/v1/jobs/{held['id']}/cancel").json()["status"] == "cancelled"
    after, families = scrape(stack)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("gemmaq_jobs_submitted_total", variant=variant) >= 2
    assert moved("gemmaq_jobs_ended_total", variant=variant, status="succeeded", code="") >= 2
    assert moved("gemmaq_jobs_ended_total", variant="echo-held", status="cancelled", code="CANCELLED") == 1
    for kind in ("input", "output"):
        used = sum(j["result"]["usage"][f"{kind}_tokens"] for j in jobs)
        assert moved("gemmaq_tokens_total", variant=variant, kind=kind) >= used > 0
    for histogram in (
        "gemmaq_job_duration_seconds",
        "gemmaq_queue_wait_seconds",
        "gemmaq_time_to_first_token_seconds",
        "gemmaq_job_tokens_per_second",
        "gemmaq_batch_size",
    ):
        assert moved(f"{histogram}_count", variant=variant) >= 2, histogram
        assert moved(f"{histogram}_sum", variant=variant) > 0, histogram
        buckets = sorted(
            (float(dict(labels)["le"]), v)
            for (name, labels), v in after.items()
            if name == f"{histogram}_bucket" and dict(labels)["variant"] == variant
        )
        counts = [v for _, v in buckets]
        assert counts == sorted(counts) and counts[-1] == value(after, f"{histogram}_count", variant=variant)
    worker = f"{stack.namespace}@test"
    assert value(after, "gemmaq_worker_up", worker=worker, device="cpu") == 1
    assert value(after, "gemmaq_variant_warm", worker=worker, variant=variant, state="warm") == 1
    assert value(after, "gemmaq_worker_memory_budget_bytes", worker=worker) > 0
    assert families >= {"gemmaq_jobs_ended", "gemmaq_queue_depth", "gemmaq_worker_device_memory_bytes"}


@pytest.mark.stack
def test_grafana_dashboard_charts_every_family(stack: Stack) -> None:
    dashboard = json.loads(Path(DASHBOARD).read_text())
    panels = [p for p in dashboard["panels"] if p.get("type") != "row"]
    assert panels and all(p.get("title") and p.get("targets") for p in panels)
    queries = " ".join(t["expr"] for p in panels for t in p["targets"])
    _, families = scrape(stack)
    charted = {f for f in families if re.search(rf"\b{f}(_total|_bucket|_sum|_count)?\b", queries)}
    missing = families - charted
    assert not missing, f"no panel charts {sorted(missing)}"


@pytest.mark.stack
def test_summary_over_the_callers_jobs(stack: Stack) -> None:
    with stack.client(stack.new_key("summary")) as client:
        empty = client.get("/v1/metrics/summary").json()
        assert empty["jobs"]["total"] == 0 and empty["success_rate"] is None and empty["alerts"] == []
        ids = [
            client.post("/v1/jobs", json={"input": {"prompt": p}, "params": {"max_new_tokens": 5}}).json()[
                "id"
            ]
            for p in ("Colours: red, green,", "Days: Monday, Tuesday,")
        ]
        jobs = [wait_job(client, job_id) for job_id in ids]
        assert all(j["status"] == "succeeded" for j in jobs)
        held = client.post("/v1/jobs", json={"variant": "echo-held", "input": {"prompt": "x"}}).json()
        assert client.post(f"/v1/jobs/{held['id']}/cancel").status_code == 200

        summary = client.get("/v1/metrics/summary", params={"window": "15m"}).json()
        assert summary["scope"] == "user" and summary["window_s"] == 900
        assert summary["jobs"] == {"total": 3, "succeeded": 2, "failed": 0, "cancelled": 1, "expired": 0}
        assert summary["success_rate"] == 1.0
        latencies = [j["metrics"]["total_ms"] for j in jobs]
        assert summary["latency_ms"]["mean"] == pytest.approx(sum(latencies) / 2)
        assert max(latencies) >= summary["latency_ms"]["p95"] >= min(latencies)
        assert summary["output_tokens"] == sum(j["result"]["usage"]["output_tokens"] for j in jobs)
        assert summary["tokens_per_second"] > 0 and summary["time_to_first_token_ms"]["mean"] > 0
        assert summary["alerts"] == []  # the defaults: p95 ≤ 10 s, ≥ 5 tokens/s, ≥ 95 % succeeded

        one = client.get("/v1/metrics/summary", params={"variant": "echo-held", "window": "1h"}).json()
        assert one["jobs"]["total"] == 1 and one["success_rate"] is None
        for window in ("abc", "0m", "40d", "5w"):
            bad = client.get("/v1/metrics/summary", params={"window": window})
            assert bad.status_code == 422 and bad.json()["error"]["code"] == "VALIDATION_ERROR", window
        unknown = client.get("/v1/metrics/summary", params={"variant": "nope"})
        assert unknown.status_code == 422 and unknown.json()["error"]["code"] == "UNKNOWN_VARIANT"


@pytest.mark.unit
def test_summaryalerts_for_past_each_threshold() -> None:
    summary = Summary(
        scope="all", variant=None, window_s=3600,
        jobs=JobCounts(total=10, succeeded=8, failed=2, cancelled=0, expired=0), success_rate=0.8,
        latency_ms=Spread(mean=9000, p95=12000), time_to_first_token_ms=Spread(mean=100, p95=200),
        tokens_per_second=3.0, input_tokens=10, output_tokens=10,
        peak_memory_mb=PeakMemory(mean=9000, max=9500), filtered=Filtered(input=0, output=0), alerts=[],
    )  # fmt: skip
    alerts = {a.metric: a for a in alerts_for(summary, Settings())}
    assert set(alerts) == {"success_rate", "latency_p95_ms", "peak_memory_mb", "tokens_per_second"}
    assert alerts["success_rate"].severity == "high" and alerts["latency_p95_ms"].threshold == 10_000
    relaxed = Settings(
        alert_min_success_rate=0.5, alert_max_latency_s=20, alert_max_memory_mb=10_000,
        alert_min_tokens_per_second=1,
    )  # fmt: skip
    assert alerts_for(summary, relaxed) == []
