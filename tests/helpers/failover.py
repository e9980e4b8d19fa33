"""Riding out a failover under load, for tests/test_failover*.py: two tenants' jobs in flight,
some followed over SSE, every API answer recorded, and the checks every failover must pass."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis

from tests.helpers.stack import Stack, wait_job
from tests.helpers.variants import shipped_variants

ROOT = Path(__file__).resolve().parent.parent.parent
REPORT = ROOT / "build" / "failover-times.json"  # what each failover took, for the notes
FOLLOWED = 4  # jobs a client follows over SSE, per scenario
VARIANTS = (
    shipped_variants()
    + """
[variants.echo-ha]
family = "diagnostic"
size = "0"
tasks = ["text"]
source = "echo"
engine = "echo"
max_batch_size = 8
echo_delay_ms = 400
description = "test-only echo variant whose batches take 0.4 s: 200 jobs stay in flight for ~10 s"
"""
)
ENV = {
    "GEMMAQ_WORKER_HEARTBEAT_S": "1",
    "GEMMAQ_LEASE_S": "3",
    "GEMMAQ_RECONCILE_INTERVAL_S": "0.5",
    "GEMMAQ_ENQUEUE_GRACE_S": "2",
}
CHARGED_BY_USER = """
SELECT coalesce(sum(CASE WHEN j.result ? 'usage'
  THEN (j.result->'usage'->>'input_tokens')::bigint + (j.result->'usage'->>'output_tokens')::bigint
  ELSE coalesce(m.input_tokens, 0) + coalesce(m.output_tokens, 0) END), 0)
FROM jobs j LEFT JOIN job_metrics m ON m.job_id = j.id AND m.attempt = j.attempts
JOIN users u ON u.id = j.user_id WHERE u.name = %s
"""
LEDGER_BY_USER = """
SELECT coalesce(sum(l.input_tokens + l.output_tokens), 0) FROM usage_ledger l
JOIN users u ON u.id = l.user_id WHERE u.name = %s
"""


@dataclass
class Loaded:
    """A stack under test: its two tenants (name → key), and a client of its Redis now."""

    stack: Stack
    tenants: dict[str, str]
    redis: Callable[[], redis.Redis]


def start(stack: Stack, worker_variants: str) -> dict[str, str]:
    """Two tenants (name → key), and the API, the reconciler and a worker of `worker_variants`."""
    quota = ("--requests-per-minute", "100000", "--max-concurrent-jobs", "1000")
    tenants = {
        name: stack.run_cli("users", "create", name, *quota).strip().splitlines()[-1]
        for name in ("tenant-a", "tenant-b")
    }
    stack.gemmaq("api", "--port", stack.url.rsplit(":", 1)[1], log="api.log")
    stack.gemmaq("reconciler", log="reconciler.log")
    stack.gemmaq("worker", "--variants", worker_variants, "--device", "cpu", "--name", "w1@failover",
                 log="worker-1.log")  # fmt: skip
    stack.wait_worker(next(iter(tenants.values())), worker_variants.split(","))
    return tenants


@dataclass
class Calls:
    """Every answer the API gave during a scenario, as (monotonic time, what, status)."""

    log: list[tuple[float, str, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, what: str, response: httpx.Response) -> httpx.Response:
        with self.lock:
            self.log.append((time.monotonic(), what, response.status_code))
        assert response.status_code != 500, f"{what} answered 500: {response.text}"
        if response.status_code == 503:
            assert response.headers.get("Retry-After"), f"{what}: a 503 without Retry-After"
        return response


def ride_out(ha: Loaded, name: str, failover: Callable[[], None], jobs_per_tenant: int) -> dict[str, Any]:
    """Two tenants' jobs in flight, some followed over SSE, while `failover` runs; then the checks."""
    calls = Calls()
    accepted: dict[str, list[str]] = {tenant: [] for tenant in ha.tenants}
    started = threading.Event()
    streams: list[dict[str, Any]] = []

    def submit(tenant: str, i: int) -> None:
        body = {"variant": "echo-ha", "input": {"prompt": f"{name} job {i} of {tenant}: " + "word " * 24},
                "params": {"max_new_tokens": 16}}  # fmt: skip
        headers = {"Idempotency-Key": f"{name}-{tenant}-{i}"}  # a retry after a 503 is the same job
        with ha.stack.client(ha.tenants[tenant]) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    response = calls.add("submit", client.post("/v1/jobs", json=body, headers=headers))
                except httpx.TransportError:  # the connection itself failed: ask again
                    response = None
                if response is not None and response.status_code in (200, 202):
                    accepted[tenant].append(response.json()["id"])
                    break
                assert response is None or response.status_code == 503, response.text
                assert time.monotonic() < deadline, "submissions were refused for two minutes"
                time.sleep(float(response.headers["Retry-After"]) / 4 if response is not None else 0.2)
        if sum(map(len, accepted.values())) >= 40:
            started.set()

    def follow(tenant: str, job_id: str) -> None:
        streams.append(_follow(ha, calls, tenant, job_id))

    with ThreadPoolExecutor(16) as pool, ThreadPoolExecutor(FOLLOWED) as followers:
        submits = [pool.submit(submit, t, i) for i in range(jobs_per_tenant) for t in ha.tenants]
        assert started.wait(60), "the jobs were not accepted"
        for tenant in ha.tenants:  # some jobs still queued and some running at the failover
            for job_id in accepted[tenant][-FOLLOWED // 2 :]:
                followers.submit(follow, tenant, job_id)
        began = time.monotonic()
        failover()
        promoted = time.monotonic() - began
        for future in submits:
            future.result()
    jobs = [job_id for ids in accepted.values() for job_id in ids]
    assert len(jobs) == len(set(jobs)) == jobs_per_tenant * len(ha.tenants)
    with ha.stack.client(None) as plain:
        done = {}
        for tenant, ids in accepted.items():
            plain.headers["Authorization"] = f"Bearer {ha.tenants[tenant]}"
            for job_id in ids:
                done[job_id] = wait_job(plain, job_id, timeout=240)
    assert all(j["status"] == "succeeded" for j in done.values()), {j["status"] for j in done.values()}
    audit(ha, jobs)
    assert len(streams) == FOLLOWED and all(s["status"] == "succeeded" for s in streams), streams
    failed = (ha.stack.logs / "worker-1.log").read_text(errors="replace").count("raised unexpected")
    assert not failed, f"{failed} task(s) failed in the worker (its log says which)"
    return {
        "failover": name,
        "promoted_s": round(promoted, 2),
        **_outages(ha, calls, jobs, began),
        "streams": streams,
    }


def _follow(ha: Loaded, calls: Calls, tenant: str, job_id: str) -> dict[str, Any]:
    """Follow a job's events to its end, resuming from the last event id when a stream breaks or
    ends with an `error` event; how many times, and the longest wait between two events."""
    last_id: str | None = None
    resumed, longest, seen = 0, 0.0, time.monotonic()
    with ha.stack.client(ha.tenants[tenant]) as client:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            try:
                with client.stream(
                    "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=60
                ) as response:
                    calls.add("events", response)
                    if response.status_code == 503:
                        time.sleep(0.5)
                        resumed += 1
                        continue
                    assert response.status_code == 200, response.read()
                    for event, data, event_id in _sse(response):
                        now = time.monotonic()
                        longest, seen = max(longest, now - seen), now
                        last_id = event_id or last_id
                        if event == "done":
                            return {"job_id": job_id, "status": data["status"], "resumed": resumed,
                                    "longest_gap_s": round(longest, 2)}  # fmt: skip
                        if event == "error":
                            break
            except httpx.TransportError:
                pass
            resumed += 1
            time.sleep(0.2)
    raise AssertionError(f"the stream of {job_id} never ended")


def _sse(response: httpx.Response) -> Iterator[tuple[str, dict[str, Any], str | None]]:
    event: dict[str, str] = {}
    for line in response.iter_lines():
        if not line:
            if "data" in event:
                yield event.get("event", "message"), json.loads(event["data"]), event.get("id")
            event = {}
        elif not line.startswith(":"):
            key, _, text = line.partition(":")
            event[key] = text[1:] if text.startswith(" ") else text


def audit(ha: Loaded, jobs: list[str]) -> None:
    """Each job completed once; each tenant's ledger is what its jobs used, and what /v1/usage
    shows; no concurrency slot stays held."""
    twice = ha.stack.sql(
        "SELECT job_id FROM job_metrics WHERE job_id = ANY(%s) AND output_tokens IS NOT NULL "
        "GROUP BY job_id HAVING count(*) > 1",
        jobs,
    )
    assert not twice, f"jobs that completed twice: {twice}"
    whole = ha.stack.sql(
        "SELECT count(*) FROM jobs j WHERE j.id = ANY(%s) AND j.result IS NOT NULL AND EXISTS"
        " (SELECT 1 FROM job_metrics m WHERE m.job_id = j.id AND m.attempt = j.attempts"
        " AND m.output_tokens IS NOT NULL)",
        jobs,
    )
    assert whole == [(len(jobs),)], (
        f"jobs without their result or metrics: {len(jobs) - int(str(whole[0][0]))}"
    )
    for tenant, key in ha.tenants.items():
        charged = ha.stack.sql(CHARGED_BY_USER, tenant)[0][0]
        ledger = ha.stack.sql(LEDGER_BY_USER, tenant)[0][0]
        assert charged == ledger, (tenant, charged, ledger)
        with ha.stack.client(key) as client:
            deadline = time.monotonic() + 30
            while True:
                usage = client.get("/v1/usage").json()
                if usage["concurrent_jobs"]["active"] == 0 and usage["tokens"]["reserved"] == 0:
                    break
                assert time.monotonic() < deadline, (
                    f"{tenant}: slots or reservations left: {usage} {holders(ha)}"
                )
                time.sleep(0.5)
            assert usage["tokens"]["used"] == ledger, (tenant, usage["tokens"], ledger)


def _outages(ha: Loaded, calls: Calls, jobs: list[str], began: float) -> dict[str, float]:
    """From the first error to the first success after it: the API's answers, and the gap in
    the jobs' ends (the workers)."""
    api = 0.0
    failed_at = None
    for at, _, status in sorted(calls.log):
        if at < began:
            continue
        if status >= 500 and failed_at is None:
            failed_at = at
        elif status < 500 and failed_at is not None:
            api = max(api, at - failed_at)
            failed_at = None
    ends = ha.stack.sql(
        "SELECT extract(epoch FROM finished_at) FROM jobs WHERE id = ANY(%s) ORDER BY finished_at", jobs
    )
    times = [float(t) for (t,) in ends]  # type: ignore[arg-type]
    workers = max((b - a for a, b in itertools.pairwise(times)), default=0.0)
    return {"api_s": round(api, 2), "workers_s": round(workers, 2)}


def cancel_stops_a_job(ha: Loaded) -> None:
    """After the failover, a cancel reaches the worker: a long generation stops early."""
    key = next(iter(ha.tenants.values()))
    with ha.stack.client(key) as client:
        body = {"variant": "gemma-3-270m", "input": {"prompt": "Write a very long story about the sea."},
                "params": {"max_new_tokens": 400}}  # fmt: skip
        job_id = client.post("/v1/jobs", json=body).json()["id"]
        deadline = time.monotonic() + 120
        while client.get(f"/v1/jobs/{job_id}").json()["status"] != "running":
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.1)
        time.sleep(0.5)
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code in (200, 202)
        job = wait_job(client, job_id, timeout=60)
    assert job["status"] == "cancelled", job["status"]
    metrics = ha.stack.sql("SELECT output_tokens FROM job_metrics WHERE job_id = %s", job_id)
    assert all(int(str(tokens or 0)) < 400 for (tokens,) in metrics), metrics


def save(ha: Loaded, report: dict[str, Any]) -> None:
    """What each failover took, added to REPORT (and the test's logs folder)."""
    for path in (REPORT, ha.stack.logs / REPORT.name):
        path.parent.mkdir(parents=True, exist_ok=True)
        reports = json.loads(path.read_text()) if path.exists() else []
        path.write_text(
            json.dumps([*[r for r in reports if r["failover"] != report["failover"]], report], indent=2)
        )


def holders(ha: Loaded) -> list[tuple[str, str, object]]:
    """The concurrency slots held now: (job id, holder, the job's status or None without a row)."""
    with ha.redis() as client:
        held = [
            (k, v)
            for key in client.scan_iter(match="ha:quota:*:active")
            for k, v in client.hgetall(key).items()
        ]
    out = []
    for job_id, holder in held:
        rows = ha.stack.sql("SELECT status FROM jobs WHERE id = %s", job_id.decode())
        out.append((job_id.decode(), holder.decode(), rows[0][0] if rows else None))
    return out
