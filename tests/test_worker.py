"""Worker behaviour a deployment relies on: idempotent completion, absent weights, safe logs."""

from __future__ import annotations

import base64
import json
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import redis
from celery import Celery

from core import keys
from core.broker import enqueue_job, make_celery, task_message
from core.settings import Settings
from tests.helpers.stack import Stack, wait_job


@pytest.mark.stack
def test_redelivered_job_never_writes_a_second_result(
    stack: Stack, client: httpx.Client, broker: Celery
) -> None:
    job = wait_job(
        client, client.post("/v1/jobs", json={"variant": "echo", "input": {"prompt": "once"}}).json()["id"]
    )
    assert job["status"] == "succeeded"
    for _ in range(3):  # the same message delivered again, as after a lost ack
        enqueue_job(broker, job_id=job["id"], variant="echo", priority=5)
    marker = client.post("/v1/jobs", json={"variant": "echo", "input": {"prompt": "marker"}}).json()
    assert wait_job(client, marker["id"])["status"] == "succeeded"
    time.sleep(0.5)
    again = client.get(f"/v1/jobs/{job['id']}").json()
    assert again["finished_at"] == job["finished_at"] and again["result"] == job["result"]
    assert again["attempts"] == 1
    assert stack.sql("SELECT count(*) FROM job_metrics WHERE job_id = %s", job["id"]) == [(1,)]


@pytest.mark.stack
def test_worker_reports_absent_weights_and_stays_up(stack: Stack, key: str) -> None:
    name = f"absent-{uuid.uuid4().hex[:6]}@test"
    worker = stack.gemmaq("worker", "--variants", "gemma-3-4b-it", "--device", "cpu", "--name", name,
                          log="worker-absent.log")  # fmt: skip
    deadline = time.monotonic() + 120
    with stack.client(key) as c:
        while True:
            model = next(m for m in c.get("/v1/models").json()["data"] if m["id"] == "gemma-3-4b-it")
            mine = [w for w in model["workers"] if w["worker"] == name]
            if mine and mine[0]["state"] == "unavailable":
                break
            assert time.monotonic() < deadline, "the worker never reported the variant"
            time.sleep(0.5)
    assert "google/gemma-3-4b-it" in (mine[0]["reason"] or "")
    assert model["available"] is False
    time.sleep(2)
    assert worker.poll() is None, "a worker with nothing to serve must not exit (no crash loop)"
    log_lines = (stack.logs / "worker-absent.log").read_text().splitlines()
    events = [json.loads(line) for line in log_lines if line.startswith("{")]
    assert any(e["event"] == "variant.unavailable" and e["variant"] == "gemma-3-4b-it" for e in events)
    worker.terminate()
    assert worker.wait(timeout=30) == 0


@pytest.mark.stack
def test_no_prompt_or_output_in_any_log_line(stack: Stack, client: httpx.Client) -> None:
    canary = f"canary-{uuid.uuid4().hex}"
    for variant in ("echo", "gemma-3-270m"):
        body = {"variant": variant, "input": {"prompt": f"{canary} says"}, "params": {"max_new_tokens": 4}}
        job = wait_job(client, client.post("/v1/jobs", json=body).json()["id"])
        assert job["status"] == "succeeded"
    echoed = wait_job(
        client, client.post("/v1/jobs", json={"variant": "echo", "input": {"prompt": canary}}).json()["id"]
    )
    assert echoed["result"]["text"] == canary  # the output holds the canary too
    time.sleep(0.5)
    for log in stack.logs.glob("*.log"):
        text = log.read_text(errors="replace")
        assert canary not in text, f"{log.name} carries a prompt or an output"
    lines = (stack.logs / "worker.log").read_text().splitlines()
    finished = [json.loads(x) for x in lines if x.startswith("{") and '"job.finished"' in x]
    assert finished and all({"job_id", "user_id", "variant"} <= set(e) for e in finished)


def _orphan(stack: Stack, client: httpx.Client, attempts: int) -> str:
    """A job left `running` by a worker that died (its heartbeat is gone), with its message redelivered."""
    seed = wait_job(
        client, client.post("/v1/jobs", json={"variant": "echo", "input": {"prompt": "x"}}).json()["id"]
    )
    job_id = f"job_orphan{uuid.uuid4().hex[:12]}"
    stack.sql(
        """INSERT INTO jobs (id, user_id, variant, task, status, priority, input, params, metadata,
                             attempts, worker, created_at, started_at)
           SELECT %s, user_id, 'echo', 'text', 'running', 5, '{"prompt": "orphan"}', params, '{}',
                  %s, 'ghost@gone', now(), now()
           FROM jobs WHERE id = %s RETURNING id""",
        job_id,
        attempts,
        seed["id"],
    )
    with make_celery(stack.settings()) as broker:
        enqueue_job(broker, job_id=job_id, variant="echo", priority=5)
    return job_id


@pytest.mark.stack
def test_job_of_a_dead_worker_runs_again_on_redelivery(stack: Stack, client: httpx.Client) -> None:
    job = wait_job(client, _orphan(stack, client, attempts=1))
    assert job["status"] == "succeeded" and job["attempts"] == 2
    assert job["result"]["text"] == "orphan" and job["metrics"]["attempt"] == 2


@pytest.mark.stack
def test_job_whose_workers_keep_dying_ends_failed(stack: Stack, client: httpx.Client) -> None:
    job = wait_job(client, _orphan(stack, client, attempts=3), timeout=30)
    assert job["status"] == "failed" and job["error"]["code"] == "GENERATION_ERROR"
    assert "lost" in job["error"]["message"]


@pytest.mark.stack
def test_queued_job_past_its_deadline_expires_without_running(stack: Stack, client: httpx.Client) -> None:
    deadline = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
    body = {"variant": "echo-held", "input": {"prompt": "too late"}, "expires_at": deadline}
    queued = client.post("/v1/jobs", json=body)
    assert queued.status_code == 202 and queued.json()["expires_at"] is not None
    job = wait_job(client, queued.json()["id"], timeout=30)
    assert job["status"] == "expired" and job["error"]["code"] == "EXPIRED" and job["started_at"] is None
    assert client.get("/v1/usage").json()["concurrent_jobs"]["active"] == 0
    past = client.post("/v1/jobs", json=body | {"expires_at": "2020-01-01T00:00:00Z"})
    assert past.status_code == 422 and "expires_at" in past.json()["error"]["message"]


@pytest.mark.stack
def test_job_past_its_time_limit_ends_timeout(client: httpx.Client) -> None:
    body = {"input": {"prompt": "Write a very long story about the sea."},
            "params": {"max_new_tokens": 500, "timeout_s": 1}}  # fmt: skip
    job = wait_job(client, client.post("/v1/jobs", json=body).json()["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "TIMEOUT", job
    assert job["finished_at"] is not None
    over = client.post("/v1/jobs", json=body | {"params": {"timeout_s": 10_000}})
    assert over.status_code == 422 and over.json()["error"]["details"]["limit"] == 600


@pytest.mark.stack
def test_duplicate_message_of_a_running_job_leaves_it_alone(
    stack: Stack, client: httpx.Client, broker: Celery
) -> None:
    """A second delivery while the job runs must not touch its lease (or the reconciler would
    requeue a healthy job and throw its result away)."""
    body = {"input": {"prompt": "Write a very long story about the sea."}, "params": {"max_new_tokens": 160}}
    job_id = client.post("/v1/jobs", json=body).json()["id"]
    deadline = time.monotonic() + 120
    while client.get(f"/v1/jobs/{job_id}").json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for _ in range(2):
        enqueue_job(broker, job_id=job_id, variant="gemma-3-270m", priority=5)
    time.sleep(1.0)
    with redis.Redis.from_url(stack.redis_url, decode_responses=True) as r:
        lease = r.get(f"{stack.namespace}:lease:{job_id}")
    assert isinstance(lease, str) and lease.startswith(f"{stack.namespace}@test/")
    job = wait_job(client, job_id)
    assert job["status"] == "succeeded" and job["attempts"] == 1, job
    assert stack.sql("SELECT count(*) FROM job_metrics WHERE job_id = %s", job_id) == [(1,)]


@pytest.mark.stack
def test_a_message_of_a_job_that_has_ended_settles_it_again(
    stack: Stack, client: httpx.Client, broker: Celery
) -> None:
    """A message that arrives after its job ended (one the reconciler sent again because a Redis
    failover lost the mark of its first) finds the end and settles it again: a concurrency slot
    the job still held (its worker died before releasing it) is released at once."""
    job = wait_job(
        client, client.post("/v1/jobs", json={"variant": "echo", "input": {"prompt": "once"}}).json()["id"]
    )
    assert job["status"] == "succeeded"
    [(user_id,)] = stack.sql("SELECT user_id FROM jobs WHERE id = %s", job["id"])
    active = f"{stack.namespace}:quota:{user_id}:active"
    log = stack.logs / "worker.log"
    logged = log.stat().st_size
    with redis.Redis.from_url(stack.redis_url) as r:
        r.hset(active, job["id"], f"0|{datetime.now(UTC).date().isoformat()}|{int(time.time() * 1000)}")
        enqueue_job(broker, job_id=job["id"], variant="echo", priority=5)
        deadline = time.monotonic() + 10
        while r.hexists(active, job["id"]):
            assert time.monotonic() < deadline, "the second message did not settle the ended job"
            time.sleep(0.05)
    time.sleep(0.5)
    with log.open("rb") as f:
        f.seek(logged)
        errors = [
            line for line in f.read().decode(errors="replace").splitlines() if '"level": "error"' in line
        ]
    assert not errors, errors  # the message was handled, not dropped by a failing task
    assert client.get(f"/v1/jobs/{job['id']}").json()["attempts"] == 1


@pytest.mark.unit
def test_the_api_sends_the_message_kombu_would(embedded_redis: str) -> None:
    """The API pushes task messages itself (core.broker.send_job): each must be what kombu sends."""
    settings = Settings(redis_url=embedded_redis, namespace=f"message-{uuid.uuid4().hex[:8]}")
    app = make_celery(settings)
    client = redis.Redis.from_url(embedded_redis)
    try:
        # A step past kombu's own 0..9 (shared priority 5, 20 jobs in flight, priority 7):
        # (9 - 5) * 40 + 2 * 10 + (9 - 7) = 182; the transport keeps it.
        enqueue_job(app, job_id="job_same", variant="echo", priority=7, in_flight=20, shared=5)
        queue, ours = task_message(app, job_id="job_same", variant="echo", priority=7, in_flight=20, shared=5)
        assert queue.endswith(":182")
        theirs = client.lindex(queue, 0)
        assert theirs is not None, f"kombu did not push to {queue}"
        assert _shape(ours) == _shape(theirs)
    finally:
        client.delete(*client.keys(f"{settings.namespace}:*"))
        client.close()
        app.close()


def _shape(raw: str | bytes) -> dict[str, object]:
    """A task message with its ids blanked and its body decoded."""
    message = json.loads(raw)
    message["body"] = json.loads(base64.b64decode(message["body"]))
    message["headers"] |= {"id": "-", "root_id": "-"}
    message["properties"] |= {"correlation_id": "-", "delivery_tag": "-"}
    return dict(message)


@pytest.mark.stack
def test_a_job_whose_workers_were_all_lost_fails_once(stack: Stack, client: httpx.Client) -> None:
    """The reconciler ends a running job that no worker holds a lease on, on its last attempt,
    through the one path every job's end takes: failed, its lost attempt's metrics row written
    (which worker, how long it held the job), its end published — once, however often it runs."""
    from workers.reconciler import Reconciler

    job = wait_job(
        client, client.post("/v1/jobs", json={"variant": "echo", "input": {"prompt": "x"}}).json()["id"]
    )
    # As if a worker "ghost" had claimed a second attempt five seconds ago, then died.
    stack.sql(
        "UPDATE jobs SET status = 'running', attempts = 2, worker = 'ghost', result = NULL, error = NULL,"
        " finished_at = NULL, started_at = now() - interval '5 seconds' WHERE id = %s",
        job["id"],
    )
    settings = stack.settings().model_copy(update={"max_attempts": 2, "lease_s": 0})
    reconciler = Reconciler(settings)
    try:
        assert reconciler.once()["failed"] == 1
        assert reconciler.once()["failed"] == 0
    finally:
        reconciler.redis.close()
        reconciler.broker.close()
    failed = client.get(f"/v1/jobs/{job['id']}").json()
    assert failed["status"] == "failed" and failed["error"]["code"] == "GENERATION_ERROR"
    assert "lost on all 2 attempts" in failed["error"]["message"]
    [(worker, total_ms)] = stack.sql(
        "SELECT worker, total_ms FROM job_metrics WHERE job_id = %s AND attempt = 2", job["id"]
    )
    assert worker == "ghost" and 4000 < float(str(total_ms)) < 60_000
    with redis.Redis.from_url(settings.broker_url) as events:
        stream = events.xrange(keys.events_key(settings, job["id"]))
    assert stream is not None and json.loads(stream[-1][1][b"data"]) == {"status": "failed"}
