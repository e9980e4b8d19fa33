"""Workers SIGKILLed while busy, twenty times in a row, each replaced at once: every job ends
`succeeded` exactly once — with a `gemmaq reconciler` process, and with none (the API and the
workers take its duties over)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from core.keys import lease_key, message_key
from tests.helpers.stack import Stack, private_stack, wait_healthy
from tests.helpers.variants import EXTRA_VARIANTS, shipped_variants

pytestmark = pytest.mark.faults

KILLS = 20
VARIANT = "echo-slow"  # batches of up to 4 that take 1.5 s: there is always something running


@pytest.fixture(scope="module", params=["with a reconciler", "without a reconciler"])
def deployment(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {
        "GEMMAQ_WORKER_HEARTBEAT_S": "1",
        "GEMMAQ_LEASE_S": "3",
        "GEMMAQ_RECONCILE_INTERVAL_S": "0.5",
        "GEMMAQ_ENQUEUE_GRACE_S": "2",
        "GEMMAQ_MAX_ATTEMPTS": "50",  # a job may be caught by several of the kills in a row
    }
    variants = shipped_variants() + EXTRA_VARIANTS
    folder = tmp_path_factory.mktemp("kills")
    with private_stack(folder, namespace="kills", variants=variants, env=env) as (stack, _, _):
        api = stack.gemmaq("api", "--port", stack.url.rsplit(":", 1)[1], log="api.log")
        wait_healthy(stack.url, api)
        if request.param == "with a reconciler":
            stack.gemmaq("reconciler", log="reconciler.log")
        yield stack


def _worker(stack: Stack, n: int) -> subprocess.Popen[bytes]:
    return stack.gemmaq("worker", "--variants", VARIANT, "--device", "cpu", "--name", f"w{n}@kills",
                        log=f"worker-{n}.log")  # fmt: skip


def _busy(stack: Stack, name: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not stack.sql("SELECT 1 FROM jobs WHERE status = 'running' AND worker = %s", name):
        assert time.monotonic() < deadline, f"{name} never ran a job; see {stack.logs}"
        time.sleep(0.1)


def _why(stack: Stack, left: list[tuple[object, ...]]) -> list[tuple[object, ...]]:
    """Each stuck job with its message marker and its lease's holder, as Redis has them."""
    r = redis.Redis.from_url(stack.redis_url)
    settings = stack.settings()
    return [
        (*job, r.get(message_key(settings, str(job[0]))), r.get(lease_key(settings, str(job[0]))))
        for job in left
    ]


def test_busy_workers_killed_twenty_times_lose_no_job(deployment: Stack) -> None:
    stack = deployment
    key = stack.new_key("tenant", max_concurrent_jobs=1000, requests_per_minute=100000)
    jobs: list[str] = []
    worker = _worker(stack, 0)
    with stack.client(key) as client:
        for n in range(KILLS):
            for i in range(3):
                body = {"variant": VARIANT, "input": {"prompt": f"kill {n} job {i}"}}
                response = client.post("/v1/jobs", json=body)
                assert response.status_code == 202, response.text
                jobs.append(response.json()["id"])
            _busy(stack, f"w{n}@kills")
            worker.kill()
            worker.wait(timeout=30)
            stack.processes.remove(worker)
            worker = _worker(stack, n + 1)  # the replacement, at once
        deadline = time.monotonic() + 240
        while True:
            left = stack.sql("SELECT id, status, attempts FROM jobs WHERE status IN ('queued', 'running')")
            if not left:
                break
            assert time.monotonic() < deadline, (
                f"still queued or running: {_why(stack, left)}; see {stack.logs}"
            )
            time.sleep(0.5)
    statuses = stack.sql("SELECT status, count(*) FROM jobs WHERE id = ANY(%s) GROUP BY status", jobs)
    assert statuses == [("succeeded", len(jobs))], statuses
    # Exactly once: one attempt of each job produced output, and the ledger counts it once.
    done = stack.sql(
        "SELECT job_id, count(*) FROM job_metrics WHERE job_id = ANY(%s) AND output_tokens IS NOT NULL"
        " GROUP BY job_id",
        jobs,
    )
    assert len(done) == len(jobs) and all(n == 1 for _, n in done)
    ledger = stack.sql("SELECT sum(jobs) FROM usage_ledger")[0][0]
    assert ledger == len(jobs)
    assert Path(stack.logs).exists()
