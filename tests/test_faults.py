"""Jobs survive crashes: killed workers and APIs, Redis and PostgreSQL going away, SIGTERM.

These tests run on a PostgreSQL and a Redis of their own (gemmaq.servers), which they stop,
kill and restart; the machine's shared services are never touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from core import faults
from gemmaq.embedded import free_port
from gemmaq.servers import PostgresProcess, RedisProcess
from tests.helpers.http import sse
from tests.helpers.stack import Stack, private_stack, wait_healthy, wait_job
from tests.helpers.variants import shipped_variants

pytestmark = pytest.mark.faults

VARIANTS = "gemma-3-270m,echo"
STORY = "Write a very long story about a lighthouse keeper and the sea."
# What every job was charged: its result's usage, or, ended without one, what its last attempt's
# metrics say it read and generated.
CHARGED = """
SELECT coalesce(sum(CASE WHEN j.result ? 'usage'
  THEN (j.result->'usage'->>'input_tokens')::bigint + (j.result->'usage'->>'output_tokens')::bigint
  ELSE coalesce(m.input_tokens, 0) + coalesce(m.output_tokens, 0) END), 0)
FROM jobs j LEFT JOIN job_metrics m ON m.job_id = j.id AND m.attempt = j.attempts
"""


@dataclass
class Faulty:
    stack: Stack
    pg: PostgresProcess
    redis: RedisProcess
    key: str

    def worker(
        self, name: str, variants: str = VARIANTS, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        proc = self.stack.gemmaq("worker", "--variants", variants, "--device", "cpu", "--name",
                                 f"{name}@faults", log=f"worker-{name}.log", env=env)  # fmt: skip
        self.stack.wait_worker(self.key, variants.split(","), name=f"{name}@faults")
        return proc

    def stop(self, proc: subprocess.Popen[bytes], sig: int) -> int:
        proc.send_signal(sig)
        code = proc.wait(timeout=120)
        self.stack.processes.remove(proc)
        return code

    def client(self) -> httpx.Client:
        return self.stack.client(self.key)

    def submit(self, client: httpx.Client, prompt: str, variant: str = "gemma-3-270m", **params: Any) -> str:
        body = {"variant": variant, "input": {"prompt": prompt}, "params": {"max_new_tokens": 32} | params}
        response = client.post("/v1/jobs", json=body)
        assert response.status_code == 202, response.text
        return str(response.json()["id"])

    def submit_batch(self, client: httpx.Client, prompts: list[str], **params: Any) -> list[str]:
        """At once, so the worker's batcher (max_wait_ms raised here) gathers them into one batch."""
        with ThreadPoolExecutor(len(prompts)) as pool:
            return list(pool.map(lambda p: self.submit(client, p, **params), prompts))

    def audit(self, job_ids: list[str]) -> None:
        """Exactly one result per job, usage in the ledger once, no slot left held."""
        rows = self.stack.sql("SELECT id, status, result IS NOT NULL FROM jobs WHERE id = ANY(%s)", job_ids)
        assert sorted(str(r[0]) for r in rows) == sorted(job_ids)
        used = self.stack.sql(CHARGED)[0][0]
        ledger = self.stack.sql("SELECT coalesce(sum(input_tokens + output_tokens), 0) FROM usage_ledger")
        assert ledger == [(used,)]
        with self.client() as client:
            deadline = time.monotonic() + 15
            while client.get("/v1/usage").json()["concurrent_jobs"]["active"]:
                assert time.monotonic() < deadline, "a concurrency slot leaked"
                time.sleep(0.2)


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Faulty]:
    # Batches wait longer for their members: deterministic batches.
    variants = shipped_variants().replace("max_wait_ms = 25", "max_wait_ms = 400")
    env = {
        "GEMMAQ_WORKER_HEARTBEAT_S": "1",
        "GEMMAQ_LEASE_S": "3",
        "GEMMAQ_RECONCILE_INTERVAL_S": "0.5",
        "GEMMAQ_ENQUEUE_GRACE_S": "2",
    }
    folder = tmp_path_factory.mktemp("faults")
    with private_stack(folder, namespace="faults", variants=variants, env=env) as (stack, pg, rd):
        key = stack.run_cli("users", "create", "tenant", "--admin").strip().splitlines()[-1]
        stack.gemmaq("api", "--port", stack.url.rsplit(":", 1)[1], log="api.log")
        stack.gemmaq("reconciler", log="reconciler.log")
        yield Faulty(stack, pg, rd, key)


def _wait_running(client: httpx.Client, job_ids: list[str]) -> None:
    deadline = time.monotonic() + 120
    while any(client.get(f"/v1/jobs/{j}").json()["status"] != "running" for j in job_ids):
        assert time.monotonic() < deadline, "the jobs never started"
        time.sleep(0.1)


def _engine_pid(faulty: Faulty, worker: str) -> int:
    """The pid of the worker's engine process now (the latest it spawned)."""
    events = _events(faulty.stack.logs / f"worker-{worker}.log")
    spawned = [e for e in events if e["event"] == "engine.spawned"]
    assert spawned, "the worker logged no engine"
    return int(spawned[-1]["pid"])


def _running(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_sigkill_of_the_engine_mid_batch_restarts_it_and_every_job_succeeds_once(faulty: Faulty) -> None:
    shell = faulty.worker("e")
    engine = _engine_pid(faulty, "e")
    with faulty.client() as client:
        jobs = faulty.submit_batch(client, [f"{STORY} Verse {i}." for i in range(4)], max_new_tokens=64)
        _wait_running(client, jobs)
        time.sleep(1.0)  # some tokens into the batch
        killed_at = time.time()
        os.kill(engine, signal.SIGKILL)
        seen: set[str] = set()  # what /v1/models says of the worker meanwhile
        deadline = time.monotonic() + 120
        while not all(client.get(f"/v1/jobs/{j}").json()["status"] == "succeeded" for j in jobs):
            assert time.monotonic() < deadline, "the jobs did not finish after the engine died"
            models = client.get("/v1/models").json()["data"]
            seen |= {w["state"] for m in models if m["id"] == "gemma-3-270m" for w in m["workers"]
                     if w["worker"] == "e@faults"}  # fmt: skip
            time.sleep(0.1)
        done = [wait_job(client, j) for j in jobs]
    assert shell.poll() is None, "the shell must outlive its engine"
    assert _engine_pid(faulty, "e") != engine, "no new engine was started"
    assert "loading" in seen, seen
    for job in done:  # the same attempt, finished by the new engine: one result each
        assert job["status"] == "succeeded" and job["attempts"] == 1, job
        assert job["metrics"]["worker"] == "e@faults" and job["result"]["usage"]["output_tokens"] == 64
        # Deltas published before the death are not published again by the re-run.
        with faulty.client() as client:
            events = list(sse(client, job["id"]))
        text = "".join(e["data"]["text"] for e in events if e["event"] == "delta")
        assert text == job["result"]["text"], (text, job["result"]["text"])
    attempts = faulty.stack.sql("SELECT attempt, output_tokens FROM job_metrics WHERE job_id = ANY(%s)", jobs)
    assert sorted(attempts) == [(1, 64)] * 4
    died = [e for e in _events(faulty.stack.logs / "worker-e.log") if e["event"] == "engine.died"]
    assert len(died) == 1 and died[0]["in_hand"] == 4 and died[0]["failed"] == 0, died
    noticed = datetime.fromisoformat(died[0]["timestamp"]).timestamp() - killed_at
    assert noticed < 1.0, f"the shell noticed its engine's death after {noticed:.2f} s"
    faulty.audit(jobs)
    faulty.stop(shell, signal.SIGTERM)
    assert not _running(_engine_pid(faulty, "e")), "the engine outlived a stopped worker"


def test_a_request_that_kills_the_engine_fails_alone_and_its_batch_mates_succeed(faulty: Faulty) -> None:
    """A tenant's request that crashes the engine (here by a fault point; in life an OOM or a
    CUDA error) takes the engine down once with its batch mates in hand, then once more on its
    own: it fails, and the other tenant's jobs, sent again one at a time, all succeed."""
    shell = faulty.worker("p", env={"GEMMAQ_FAULTS": json.dumps([faults.ENGINE_POISON])})
    with faulty.client() as client:
        innocent = faulty.submit_batch(client, [f"{STORY} Song {i}." for i in range(3)], max_new_tokens=48)
        _wait_running(client, innocent)
        time.sleep(0.5)  # decoding, when the hostile request arrives
        with faulty.stack.client(faulty.stack.new_key("hostile")) as hostile:
            poison = faulty.submit(hostile, f"Hello {faults.POISON}", max_new_tokens=8)
            failed = wait_job(hostile, poison)
        done = [wait_job(client, j) for j in innocent]
    assert failed["status"] == "failed" and failed["error"]["code"] == "GENERATION_ERROR", failed
    assert "engine process died" in failed["error"]["message"]
    for job in done:
        assert job["status"] == "succeeded" and job["attempts"] == 1, job
        assert job["result"]["usage"]["output_tokens"] == 48
    died = [e for e in _events(faulty.stack.logs / "worker-p.log") if e["event"] == "engine.died"]
    assert [d["failed"] for d in died] == [0, 1], died
    assert shell.poll() is None
    faulty.audit([*innocent, poison])
    faulty.stop(shell, signal.SIGTERM)


def test_a_job_whose_engine_dies_mid_reply_on_its_last_try_is_charged_what_it_used(faulty: Faulty) -> None:
    """The engine dies after some of a request's tokens (a fault point; in life a crash mid-reply),
    then again when it is sent alone: the job fails, and its owner is charged the prompt and the
    tokens generated by then, as the shell last heard of them: in /v1/usage, the ledger and the
    job's metrics, once."""
    shell = faulty.worker("l", env={"GEMMAQ_FAULTS": json.dumps([faults.ENGINE_POISON_LATE])})
    with faulty.stack.client(faulty.stack.new_key("late")) as client:
        job_id = faulty.submit(client, f"{STORY} {faults.POISON_LATE}", max_new_tokens=64)
        job = wait_job(client, job_id)
        used = client.get("/v1/usage").json()["tokens"]["used"]
    assert job["status"] == "failed" and "engine process died" in job["error"]["message"], job
    read, generated = job["metrics"]["input_tokens"], job["metrics"]["output_tokens"]
    assert read > 10 and 0 < generated < 64, job["metrics"]
    assert used == read + generated
    faulty.audit([job_id])
    faulty.stop(shell, signal.SIGTERM)


def test_sigkill_mid_batch_every_job_still_succeeds_once(faulty: Faulty) -> None:
    first = faulty.worker("a")
    engine = _engine_pid(faulty, "a")
    with faulty.client() as client:
        jobs = faulty.submit_batch(client, [f"{STORY} Part {i}." for i in range(4)], max_new_tokens=96)
        _wait_running(client, jobs)
        time.sleep(1.0)  # some tokens into the batch
        assert faulty.stop(first, signal.SIGKILL) == -signal.SIGKILL
        # The shell is gone: its engine follows it within 5 s, leaving nothing on the device.
        deadline = time.monotonic() + 5
        while _running(engine):
            assert time.monotonic() < deadline, "the engine outlived its shell"
            time.sleep(0.05)
        second = faulty.worker("b")
        done = [wait_job(client, j) for j in jobs]
    for job in done:
        assert job["status"] == "succeeded" and job["attempts"] == 2, job
        assert job["metrics"]["worker"] == "b@faults" and job["result"]["usage"]["output_tokens"] > 0
    attempts = faulty.stack.sql(
        "SELECT attempt, worker, output_tokens IS NOT NULL FROM job_metrics WHERE job_id = ANY(%s)", jobs
    )
    # One row per attempt: the lost one (worker a, no output), then the one that finished.
    assert sorted(attempts) == [(1, "a@faults", False)] * 4 + [(2, "b@faults", True)] * 4
    faulty.audit(jobs)
    faulty.stop(second, signal.SIGTERM)


def test_api_killed_between_commit_and_enqueue(faulty: Faulty) -> None:
    worker = faulty.worker("c")
    port = free_port()
    crashing = subprocess.Popen(
        [*faulty.stack.gemmaq_command(), "api", "--port", str(port)],
        env=faulty.stack.env | {"GEMMAQ_FAULTS": '["api.after_commit"]'},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, crashing)
    marker = f"crash-{uuid.uuid4().hex[:8]}"
    body = {"variant": "echo", "input": {"prompt": "survives the crash"}, "metadata": {"m": marker}}
    with pytest.raises(httpx.HTTPError):  # the process dies before it answers
        httpx.post(f"{url}/v1/jobs", json=body, headers={"Authorization": f"Bearer {faulty.key}"})
    assert crashing.wait(timeout=30) == -signal.SIGKILL
    job_id = str(faulty.stack.sql("SELECT id FROM jobs WHERE metadata->>'m' = %s", marker)[0][0])
    with faulty.client() as client:
        job = wait_job(client, job_id, timeout=60)
    assert job["status"] == "succeeded" and job["result"]["text"] == "survives the crash"
    resent = _resent(faulty)
    assert any(e["job_id"] == job_id for e in resent)
    faulty.audit([job_id])
    faulty.stop(worker, signal.SIGTERM)


def test_redis_outage_answers_503_fast_and_loses_no_accepted_job(faulty: Faulty) -> None:
    with faulty.client() as client:
        # Accepted while no worker serves the variant: their messages wait in Redis, and are lost
        # with it (this Redis keeps nothing on disk).
        accepted = faulty.submit_batch(client, [f"{STORY} Chapter {i}." for i in range(6)], max_new_tokens=16)
        faulty.redis.stop()
        outage_end = time.monotonic() + 10
        refusals = 0
        while time.monotonic() < outage_end:
            started = time.monotonic()
            response = client.post("/v1/jobs", json={"variant": "echo", "input": {"prompt": "during"}})
            elapsed = time.monotonic() - started
            assert response.status_code == 503 and response.json()["error"]["code"] == "UNAVAILABLE"
            assert elapsed < 1.0, f"a refusal took {elapsed:.2f} s"
            refusals += 1
            time.sleep(0.3)
        faulty.redis.start()  # empty: queued messages, markers and counters are gone
        worker = faulty.worker("d")
        done = [wait_job(client, j, timeout=240) for j in accepted]
        assert all(j["status"] == "succeeded" for j in done), [j["status"] for j in done]
        deadline = time.monotonic() + 30
        while True:  # the API recovers by itself
            after = client.post("/v1/jobs", json={"variant": "echo", "input": {"prompt": "after"}})
            if after.status_code == 202:
                break
            assert time.monotonic() < deadline, after.text
            time.sleep(0.5)
        assert wait_job(client, after.json()["id"])["status"] == "succeeded"
    assert refusals >= 10
    resent = {e["job_id"] for e in _resent(faulty)}
    assert set(accepted) <= resent, "the jobs whose messages Redis lost were not all sent again"
    faulty.audit([*accepted, after.json()["id"]])
    faulty.stop(worker, signal.SIGTERM)


def test_redis_restart_under_a_running_worker(faulty: Faulty) -> None:
    worker = faulty.worker("d2", "gemma-3-270m")  # holds 8 jobs; the rest wait in Redis
    with faulty.client() as client:
        jobs = faulty.submit_batch(client, [f"{STORY} Verse {i}." for i in range(12)], max_new_tokens=24)
        _wait_running(client, jobs[:1])
        faulty.redis.restart()
        done = [wait_job(client, j, timeout=240) for j in jobs]
    assert all(j["status"] == "succeeded" for j in done), [j["status"] for j in done]
    assert worker.poll() is None, "the worker must ride out a Redis restart"
    faulty.audit(jobs)
    faulty.stop(worker, signal.SIGTERM)


def test_postgres_outage_while_the_worker_finishes_jobs(faulty: Faulty) -> None:
    worker = faulty.worker("e")
    with faulty.client() as client:
        jobs = [faulty.submit(client, f"{STORY} Volume {i}.", max_new_tokens=64) for i in range(3)]
        _wait_running(client, jobs)
        faulty.pg.stop()
        for path in (f"/v1/jobs/{jobs[0]}", "/v1/jobs"):
            started = time.monotonic()
            response = client.get(path)
            assert response.status_code == 503 and response.json()["error"]["code"] == "UNAVAILABLE"
            assert time.monotonic() - started < 1.0
        time.sleep(8)  # the batch ends while PostgreSQL is away
        faulty.pg.start()
        done = [wait_job(client, j, timeout=180) for j in jobs]
    assert all(j["status"] == "succeeded" and j["attempts"] == 1 for j in done), done
    assert worker.poll() is None, "the worker must ride out a database restart"
    faulty.audit(jobs)
    faulty.stop(worker, signal.SIGTERM)


def test_cancel_stops_within_two_steps_and_batch_mates_finish(faulty: Faulty) -> None:
    worker = faulty.worker("f")
    with faulty.client() as client:
        jobs = faulty.submit_batch(client, [f"{STORY} Book {i}." for i in range(3)], max_new_tokens=80)
        _wait_running(client, jobs)
        time.sleep(1.0)
        assert client.post(f"/v1/jobs/{jobs[0]}/cancel").status_code == 202
        done = [wait_job(client, j) for j in jobs]
    assert done[0]["status"] == "cancelled" and done[0]["result"]["finish_reason"] == "cancelled"
    for job in done[1:]:
        assert job["status"] == "succeeded" and job["result"]["usage"]["output_tokens"] == 80
        assert job["metrics"]["batch_size"] == 3
    finished = [e for e in _events(faulty.stack.logs / "worker-f.log") if e.get("job_id") == jobs[0]
                and e["event"] == "job.finished"]  # fmt: skip
    assert finished and 1 <= finished[0]["cancel_lag_steps"] <= 2, finished
    faulty.audit(jobs)
    faulty.stop(worker, signal.SIGTERM)


def test_sigterm_finishes_the_batch_and_hands_back_the_rest(faulty: Faulty) -> None:
    first = faulty.worker("g")
    with faulty.client() as client:
        jobs = faulty.submit_batch(client, [f"{STORY} Tale {i}." for i in range(12)], max_new_tokens=48)
        _wait_running(client, jobs[:1])
        time.sleep(1.0)  # the first batch of 8 is decoding; the other 4 wait for the next
        assert faulty.stop(first, signal.SIGTERM) == 0  # waits for the batch in hand
        after_stop = {j: client.get(f"/v1/jobs/{j}").json() for j in jobs}
        finished = [j for j, v in after_stop.items() if v["status"] == "succeeded"]
        assert finished and all(after_stop[j]["metrics"]["worker"] == "g@faults" for j in finished)
        assert len(finished) < len(jobs), "nothing was left to hand back"
        assert all(v["status"] in ("succeeded", "queued") for v in after_stop.values()), after_stop
        second = faulty.worker("h")
        done = [wait_job(client, j) for j in jobs]
    assert all(j["status"] == "succeeded" and j["attempts"] == 1 for j in done)
    assert {j["metrics"]["worker"] for j in done if j["id"] not in finished} <= {"h@faults"}
    faulty.audit(jobs)
    faulty.stop(second, signal.SIGTERM)


def _events(path: Path) -> list[dict[str, Any]]:
    events = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


def _resent(faulty: Faulty) -> list[dict[str, Any]]:
    """The jobs sent again, by whichever process held the reconciler's duties then (the
    reconciler, the API or a worker)."""
    logs = faulty.stack.logs.glob("*.log")
    return [e for log in logs for e in _events(log) if e.get("event") == "job.resent"]
