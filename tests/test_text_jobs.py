"""Text jobs end to end: HTTP in → Postgres → Redis → worker (real Gemma 3 270M) → Postgres → HTTP out."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest

from tests.helpers.jobs import submit, text_job
from tests.helpers.stack import Stack, wait_job

pytestmark = pytest.mark.stack

PROMPT = "The capital city of Germany is Berlin. The capital city of France is"


def test_completion_on_gemma_3_270m(stack: Stack, client: httpx.Client) -> None:
    queued = submit(client, text_job(PROMPT))
    assert queued["status"] == "queued" and queued["result"] is None
    job = wait_job(client, queued["id"])
    assert job["status"] == "succeeded", job
    result = job["result"]
    assert "Paris" in result["text"]
    assert result["usage"]["output_tokens"] > 0 and result["usage"]["input_tokens"] > 5
    assert result["finish_reason"] in {"stop", "length"}
    metrics = job["metrics"]
    assert metrics["batch_size"] >= 1 and metrics["tokens_per_second"] > 0
    assert metrics["inference_ms"] > 0 and metrics["queue_ms"] >= 0
    assert metrics["time_to_first_token_ms"] > 0
    assert metrics["device"] == "cpu" and metrics["worker"] == f"{stack.namespace}@test"
    rows = stack.sql(
        "SELECT attempt, output_tokens, input_tokens, batch_size, worker FROM job_metrics WHERE job_id = %s",
        job["id"],
    )
    usage = result["usage"]
    assert rows == [
        (1, usage["output_tokens"], usage["input_tokens"], metrics["batch_size"], metrics["worker"])
    ]
    assert job["started_at"] <= job["finished_at"]


def test_chat_messages_use_the_chat_template(client: httpx.Client) -> None:
    body = {
        "variant": "gemma-3-270m",
        "input": {
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
            ]
        },
        "params": {"max_new_tokens": 12, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 7,
                   "repetition_penalty": 1.1},
    }  # fmt: skip
    job = wait_job(client, submit(client, body)["id"])
    assert job["status"] == "succeeded", job
    # Chat-formatted input is longer than the raw text: the template's turn markers were added.
    assert job["result"]["usage"]["input_tokens"] > 10


def test_same_seed_same_output_and_stop_strings(client: httpx.Client) -> None:
    sampled = text_job("Once upon a time", max_new_tokens=12, temperature=1.0, seed=1234)
    first, second = (wait_job(client, submit(client, sampled)["id"]) for _ in range(2))
    assert first["result"]["text"] == second["result"]["text"]
    stopped = wait_job(client, submit(client, text_job(PROMPT, max_new_tokens=20, stop=["."]))["id"])
    assert stopped["result"]["finish_reason"] == "stop"
    assert "." not in stopped["result"]["text"]


def test_nf4_variant_runs_on_cpu_through_bitsandbytes(client: httpx.Client) -> None:
    job = wait_job(client, submit(client, text_job(PROMPT, variant="gemma-3-270m-nf4"))["id"])
    assert job["status"] == "succeeded", job
    assert job["result"]["usage"]["output_tokens"] > 0
    assert job["result"]["text"].strip()


def test_warm_worker_does_not_load_again(client: httpx.Client) -> None:
    for _ in range(2):
        job = wait_job(client, submit(client, text_job("Hello there"))["id"])
        assert job["status"] == "succeeded"
    assert job["metrics"]["load_ms"] is None


def test_eight_jobs_at_once_run_in_fewer_batches(client: httpx.Client) -> None:
    prompts = [f"Fact number {i}: the sun" for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        queued = list(pool.map(lambda p: submit(client, text_job(p, max_new_tokens=16)), prompts))
    jobs = [wait_job(client, q["id"]) for q in queued]
    assert all(j["status"] == "succeeded" for j in jobs), jobs
    sizes = [j["metrics"]["batch_size"] for j in jobs]
    # A batch of size n shows up n times; the number of batches is sum(1/n).
    batches = sum(1 / s for s in sizes)
    assert max(sizes) > 1 and round(batches) < len(jobs), sizes


def test_idempotency_key_returns_the_same_job(stack: Stack, client: httpx.Client) -> None:
    first = submit(client, text_job("Idempotent", variant="echo"), **{"Idempotency-Key": "order-42"})
    again = client.post(
        "/v1/jobs", json=text_job("Idempotent", variant="echo"), headers={"Idempotency-Key": "order-42"}
    )
    assert again.status_code == 202 and again.json()["id"] == first["id"]
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert stack.sql(
        "SELECT count(*) FROM jobs WHERE idempotency_key = 'order-42' AND id = %s", first["id"]
    ) == [(1,)]
    # Another user's identical key is their own job.
    with stack.client(stack.new_key()) as other:
        assert (
            submit(other, text_job("x", variant="echo"), **{"Idempotency-Key": "order-42"})["id"]
            != first["id"]
        )


def test_echo_returns_its_input(client: httpx.Client) -> None:
    job = wait_job(client, submit(client, text_job("ping pong", variant="echo", max_new_tokens=10))["id"])
    assert job["status"] == "succeeded" and job["result"]["text"] == "ping pong"


def test_cancelled_queued_job_never_runs(stack: Stack, client: httpx.Client) -> None:
    queued = submit(client, text_job("never", variant="echo-late"))
    response = client.post(f"/v1/jobs/{queued['id']}/cancel")
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert response.json()["error"]["code"] == "CANCELLED"
    assert client.post(f"/v1/jobs/{queued['id']}/cancel").status_code == 409
    # Now a worker for the variant starts and drains its queue: the cancelled job stays untouched.
    name = f"late-{stack.namespace}@test"
    stack.gemmaq(
        "worker", "--variants", "echo-late", "--device", "cpu", "--name", name, log="worker-late.log"
    )
    marker = wait_job(client, submit(client, text_job("after", variant="echo-late"))["id"])
    assert marker["status"] == "succeeded"
    job = client.get(f"/v1/jobs/{queued['id']}").json()
    assert job["status"] == "cancelled" and job["started_at"] is None and job["attempts"] == 0
    assert stack.sql("SELECT count(*) FROM job_metrics WHERE job_id = %s", queued["id"]) == [(0,)]


def test_running_job_can_be_cancelled_with_partial_output(client: httpx.Client) -> None:
    queued = submit(client, text_job("Write a very long story about the sea.", max_new_tokens=500))
    deadline = time.monotonic() + 120
    while client.get(f"/v1/jobs/{queued['id']}").json()["status"] != "running":
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.05)
    time.sleep(0.5)  # let it decode a few tokens
    response = client.post(f"/v1/jobs/{queued['id']}/cancel")
    assert response.status_code == 202 and response.json()["status"] == "running"
    job = wait_job(client, queued["id"])
    assert job["status"] == "cancelled" and job["error"]["code"] == "CANCELLED"
    assert job["result"]["finish_reason"] == "cancelled"
    assert 0 < job["result"]["usage"]["output_tokens"] < 500
    assert job["metrics"]["output_tokens"] == job["result"]["usage"]["output_tokens"]


def test_list_filters_and_cursor_pagination(stack: Stack) -> None:
    with stack.client(stack.new_key()) as c:
        ids = [submit(c, text_job(f"p{i}", variant="echo"))["id"] for i in range(5)]
        for job_id in ids:
            wait_job(c, job_id)
        seen, cursor = [], None
        while True:
            page = c.get("/v1/jobs", params={"limit": 2} | ({"cursor": cursor} if cursor else {})).json()
            seen += [j["id"] for j in page["data"]]
            cursor = page["next_cursor"]
            assert page["has_more"] == (cursor is not None)
            if not cursor:
                break
        assert seen == list(reversed(ids))
        assert len(c.get("/v1/jobs", params={"status": "succeeded", "variant": "echo"}).json()["data"]) == 5
        assert c.get("/v1/jobs", params={"status": "queued"}).json()["data"] == []
        assert c.get("/v1/jobs", params={"variant": "gemma-3-270m"}).json()["data"] == []


def test_models_lists_variants_workers_and_availability(client: httpx.Client) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    models = {m["id"]: m for m in body["data"]}
    assert models["echo"]["diagnostic"] is True and models["echo"]["owned_by"] == "gemmaq"
    assert models["gemma-3-270m"]["available"] is True
    assert any(w["state"] == "warm" for w in models["gemma-3-270m"]["workers"])
    assert models["gemma-3-270m-nf4"]["quantization"] == "nf4"
    big = models["gemma-3-4b-it"]
    assert big["available"] is False and "google/gemma-3-4b-it" in big["unavailable_reason"]
    assert set(big["tasks"]) == {"text", "image"}
    for name in ("gemma-3-1b-it", "gemma-3-12b-it", "gemma-3-27b-it", "gemma-3n-e2b-it", "gemma-3n-e4b-it"):
        assert name in models
    gemma_4 = {
        "gemma-4-e2b-it": "google/gemma-4-E2B-it",
        "gemma-4-e4b-it": "google/gemma-4-E4B-it",
        "gemma-4-26b-a4b-it": "google/gemma-4-26B-A4B-it",
        "gemma-4-31b-it": "google/gemma-4-31B-it",
    }
    for name, repo in gemma_4.items():  # no weights in the stack's empty Hugging Face cache
        assert models[name]["available"] is False and repo in models[name]["unavailable_reason"]
    assert isinstance(models["gemma-3-270m"]["queue_depth"], int)


def test_wait_returns_early_when_the_job_finishes(client: httpx.Client) -> None:
    queued = submit(client, text_job("quick", variant="echo"))
    with httpx.Client(base_url=str(client.base_url), headers=client.headers, timeout=70) as c:
        job = c.get(f"/v1/jobs/{queued['id']}", params={"wait": 55}).json()
    assert job["status"] == "succeeded"


def test_health_and_readiness(stack: Stack) -> None:
    assert httpx.get(f"{stack.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{stack.url}/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"postgres": "ok", "redis": "ok"}


def test_a_job_ends_once(stack: Stack, client: httpx.Client) -> None:
    """`end_jobs` moves a job out of the state its end names once: a second end of a finished
    job (a redelivery, a racing reconciler, a late cancel) changes nothing, nor does a claim."""
    import redis
    from sqlalchemy import select

    from db.endings import JobEnd, end_jobs
    from db.models import Job
    from db.repo import runs
    from db.session import autocommit_engine

    settings = stack.settings()
    job = wait_job(client, submit(client, text_job("x", variant="echo"))["id"])
    client_redis = redis.Redis.from_url(settings.broker_url)
    with autocommit_engine(settings.db_url).connect() as connection:
        owner = connection.execute(select(Job.user_id).where(Job.id == job["id"])).scalar_one()
        ends = [
            JobEnd(
                job["id"], "failed", error={"code": "X", "message": "y"}, metrics={"queue_ms": 1.0}, attempt=1
            ),
            JobEnd.cancel(job["id"], owner=owner),
            JobEnd.expire(job["id"]),
        ]
        assert runs.claim_many(session=connection, job_ids=[job["id"]], worker="w") == [None]
        for end in ends:
            assert end_jobs(autocommit_engine(settings.db_url), client_redis, settings, [end]) == [None]
    client_redis.close()
    after = client.get(f"/v1/jobs/{job['id']}").json()
    assert after["status"] == "succeeded" and after["result"]["text"] == job["result"]["text"]
