"""`/metrics`: Prometheus text that prometheus_client parses, moving as real jobs run; the
Grafana dashboard shipped beside it charts every family it exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, Stack, wait_job

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
    held = client.post("/v1/jobs", json={"variant": "echo-late", "input": {"prompt": "wait"}}).json()
    during, _ = scrape(stack)
    assert value(during, "gemmaq_jobs", variant="echo-late", status="queued") >= 1
    assert value(during, "gemmaq_queue_depth", variant="echo-late") >= 1
    assert value(during, "gemmaq_oldest_queued_seconds", variant="echo-late") >= 0
    assert client.post(f"/v1/jobs/{held['id']}/cancel").json()["status"] == "cancelled"
    after, families = scrape(stack)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("gemmaq_jobs_submitted_total", variant=variant) >= 2
    assert moved("gemmaq_jobs_ended_total", variant=variant, status="succeeded", code="") >= 2
    assert moved("gemmaq_jobs_ended_total", variant="echo-late", status="cancelled", code="CANCELLED") == 1
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


def test_grafana_dashboard_charts_every_family(stack: Stack) -> None:
    dashboard = json.loads(Path(DASHBOARD).read_text())
    panels = [p for p in dashboard["panels"] if p.get("type") != "row"]
    assert panels and all(p.get("title") and p.get("targets") for p in panels)
    queries = " ".join(t["expr"] for p in panels for t in p["targets"])
    _, families = scrape(stack)
    charted = {f for f in families if re.search(rf"\b{f}(_total|_bucket|_sum|_count)?\b", queries)}
    missing = families - charted
    assert not missing, f"no panel charts {sorted(missing)}"
