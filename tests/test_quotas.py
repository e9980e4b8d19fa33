"""Quotas hold across API processes, release every slot exactly once and settle tokens to the ledger."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import redis
from celery import Celery

from core.broker import enqueue_job
from gemmaq.embedded import free_port
from tests.helpers.stack import Stack, wait_healthy, wait_job

pytestmark = pytest.mark.stack

HELD = "echo-held"  # no worker serves it: its jobs stay queued and hold their slot


def job(prompt: str, variant: str = "echo", **params: Any) -> dict[str, Any]:
    return {"variant": variant, "input": {"prompt": prompt}, "params": {"max_new_tokens": 16} | params}


def slots_held(stack: Stack, client: httpx.Client) -> int:
    """The concurrency count as Redis holds it."""
    name = client.get("/v1/usage").json()["user"]
    (uid,) = stack.sql("SELECT id FROM users WHERE name = %s", name)[0]
    with redis.Redis.from_url(stack.redis_url) as r:
        return int(r.hlen(f"{stack.namespace}:quota:{uid}:active"))


def wait_released(stack: Stack, client: httpx.Client) -> None:
    """The worker settles just after it writes the terminal state: wait for that, then for nothing."""
    deadline = time.monotonic() + 10
    while slots_held(stack, client):
        assert time.monotonic() < deadline, "a slot is still held after every job ended"
        time.sleep(0.05)
    assert client.get("/v1/usage").json()["concurrent_jobs"]["active"] == 0


@pytest.fixture
def second_api(stack: Stack) -> Iterator[str]:
    port = free_port()
    proc = stack.gemmaq("api", "--port", str(port), log="api-second.log")
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


async def _burst(urls: list[str], key: str, count: int) -> list[httpx.Response]:
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(headers=headers, timeout=120, limits=limits) as http:
        calls = [http.post(f"{urls[i % len(urls)]}/v1/jobs", json=job(f"burst {i}")) for i in range(count)]
        return list(await asyncio.gather(*calls))


def test_rate_limit_is_exact_across_two_api_processes(stack: Stack, second_api: str) -> None:
    key = stack.new_key("rpm", requests_per_minute=10)
    other = stack.new_key("bystander", requests_per_minute=10)
    responses = asyncio.run(_burst([stack.url, second_api], key, 100))
    accepted = [r for r in responses if r.status_code == 202]
    refused = [r for r in responses if r.status_code == 429]
    assert len(accepted) == 10 and len(refused) == 90, sorted({r.status_code for r in responses})
    for response in refused:
        error = response.json()["error"]
        assert error["code"] == "RATE_LIMIT_EXCEEDED"
        assert error["details"]["limit"] == "requests_per_minute" and error["details"]["value"] == 10
        assert 1 <= int(response.headers["Retry-After"]) <= 60
        assert response.headers["RateLimit-Remaining"] == "0"
    for response in accepted:
        assert response.headers["RateLimit-Limit"] == "10"
    with stack.client(key) as client:
        usage = client.get("/v1/usage").json()
        assert usage["requests"] == usage["requests"] | {"limit": 10, "used": 10, "remaining": 0}
        (name,) = [usage["user"]]
    assert stack.sql(
        "SELECT count(*) FROM jobs j JOIN users u ON u.id = j.user_id WHERE u.name = %s", name
    ) == [(10,)]
    with stack.client(other) as bystander:  # another user's window is untouched
        response = bystander.post("/v1/jobs", json=job("unaffected"))
        assert response.status_code == 202 and response.headers["RateLimit-Remaining"] == "9"


def test_every_authenticated_response_carries_ratelimit_headers(stack: Stack, client: httpx.Client) -> None:
    before = client.get("/v1/jobs")
    assert before.status_code == 200
    remaining = int(before.headers["RateLimit-Remaining"])
    assert before.headers["RateLimit-Limit"] == str(remaining) and before.headers["RateLimit-Reset"] == "0"
    client.post("/v1/jobs", json=job("counted"))
    for response in (
        client.get("/v1/usage"),
        client.get("/v1/jobs/job_missing"),  # a refusal too
        client.post("/v1/jobs", json={"variant": "echo"}),  # a 422
    ):
        assert int(response.headers["RateLimit-Remaining"]) == remaining - 1, response.status_code
        assert 0 < int(response.headers["RateLimit-Reset"]) <= 60
    assert "RateLimit-Limit" not in httpx.get(f"{stack.url}/v1/jobs").headers  # not authenticated


def test_concurrent_jobs_cap_and_slots_released_in_every_terminal_state(stack: Stack, broker: Celery) -> None:
    key = stack.new_key("conc", max_concurrent_jobs=2, requests_per_minute=1000)
    with stack.client(key) as client:
        first = [client.post("/v1/jobs", json=job(f"held {i}", HELD)).json() for i in range(2)]
        third = client.post("/v1/jobs", json=job("third"))
        assert third.status_code == 429 and third.headers["Retry-After"]
        error = third.json()["error"]
        assert error["code"] == "QUOTA_EXCEEDED" and error["details"]["limit"] == "max_concurrent_jobs"
        assert error["details"]["active"] == 2
        assert client.post(f"/v1/jobs/{first[0]['id']}/cancel").json()["status"] == "cancelled"
        assert client.post("/v1/jobs", json=job("third")).status_code == 202
        # The other held job is picked up by a worker that does not serve its variant: it fails.
        enqueue_job(broker, job_id=first[1]["id"], variant="echo", priority=5)
        assert wait_job(client, first[1]["id"])["status"] == "failed"

        ended: dict[str, list[str]] = {"succeeded": [], "failed": [], "cancelled": []}

        def admit(body: dict[str, Any]) -> dict[str, Any]:
            deadline = time.monotonic() + 120
            while True:
                response = client.post("/v1/jobs", json=body)
                if response.status_code == 202:
                    return response.json()  # type: ignore[no-any-return]
                assert response.status_code == 429, response.text
                assert time.monotonic() < deadline, "a slot was never released"
                time.sleep(0.05)

        def settle(job_id: str) -> None:
            ended[wait_job(client, job_id)["status"]].append(job_id)

        ended["cancelled"].append(first[0]["id"])
        ended["failed"].append(first[1]["id"])
        ended["succeeded"].append(client.get("/v1/jobs").json()["data"][0]["id"])  # the third

        for i in range(24):  # succeeded; every third message delivered twice
            queued = admit(job(f"ok {i}"))
            if i % 3 == 0:
                enqueue_job(broker, job_id=queued["id"], variant="echo", priority=5)
            if i % 2:
                settle(queued["id"])
            else:
                ended["succeeded"].append(queued["id"])
        for i in range(8):  # cancelled while queued
            held = admit(job(f"cancel {i}", HELD))
            assert client.post(f"/v1/jobs/{held['id']}/cancel").status_code == 200
            ended["cancelled"].append(held["id"])
        for i in range(6):  # failed: run by a worker that does not serve the variant
            held = admit(job(f"misrouted {i}", HELD))
            enqueue_job(broker, job_id=held["id"], variant="echo", priority=5)
            settle(held["id"])
        for i in range(6):  # failed: its workers died too often (the message comes back each time)
            held = admit(job(f"orphan {i}", HELD))
            stack.sql(
                "UPDATE jobs SET status = 'running', attempts = 3, worker = 'ghost@gone' WHERE id = %s",
                held["id"],
            )
            enqueue_job(broker, job_id=held["id"], variant="echo", priority=5)
            settle(held["id"])
        for i in range(2):  # finished by a redelivered message after its worker died
            held = admit(job(f"redelivered {i}", HELD))
            stack.sql(
                "UPDATE jobs SET status = 'running', variant = 'echo', attempts = 1, worker = 'ghost@gone' "
                "WHERE id = %s",
                held["id"],
            )
            enqueue_job(broker, job_id=held["id"], variant="echo", priority=5)
            settle(held["id"])
        for _ in range(2):  # cancelled while running: a real model, stopped between steps
            running = admit(job("Write a very long story about the sea.", "gemma-3-270m", max_new_tokens=400))
            deadline = time.monotonic() + 120
            while client.get(f"/v1/jobs/{running['id']}").json()["status"] != "running":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert client.post(f"/v1/jobs/{running['id']}/cancel").status_code == 202
            settle(running["id"])
        for job_id in [*ended["succeeded"]]:
            ended["succeeded"].remove(job_id)
            settle(job_id)
        assert sum(map(len, ended.values())) == 51
        assert len(ended["succeeded"]) == 27 and len(ended["failed"]) == 13 and len(ended["cancelled"]) == 11
        wait_released(stack, client)
        assert client.post("/v1/jobs", json=job("after all")).status_code == 202


def test_tokens_per_day_enforced_and_ledger_equals_job_usage(stack: Stack, broker: Celery) -> None:
    key = stack.new_key("tokens", tokens_per_day=1000, requests_per_minute=1000)
    prompt = " ".join(["word"] * 50)  # echo: 50 input tokens, 50 output tokens
    done: list[dict[str, Any]] = []
    with stack.client(key) as client:
        while True:
            response = client.post("/v1/jobs", json=job(prompt, max_new_tokens=50))
            if response.status_code == 429:
                break
            assert response.status_code == 202 and len(done) < 20
            queued = response.json()
            enqueue_job(broker, job_id=queued["id"], variant="echo", priority=5)  # delivered twice
            finished = wait_job(client, queued["id"])
            assert finished["result"]["usage"] == {"input_tokens": 50, "output_tokens": 50}
            done.append(finished)
            wait_released(stack, client)
        error = response.json()["error"]
        assert error["code"] == "QUOTA_EXCEEDED" and error["details"]["limit"] == "tokens_per_day"
        # 100 tokens each; the next job's reservation (input estimate + 50) no longer fits in 1000.
        assert len(done) == 9 and error["details"]["charged"] == 900
        midnight = 86400 - datetime.now(UTC).timestamp() % 86400
        assert abs(int(response.headers["Retry-After"]) - midnight) <= 5
        for finished in done[:3]:  # the same messages again, long after the jobs ended
            enqueue_job(broker, job_id=finished["id"], variant="echo", priority=5)
        marker = client.post("/v1/jobs", json=job("x", max_new_tokens=1))
        # Tokens are checked against today's total, not per job: a 1-token job still fits.
        assert marker.status_code == 202, marker.text
        done.append(wait_job(client, marker.json()["id"]))
        wait_released(stack, client)
        time.sleep(0.5)  # the repeated messages drain
        usage = client.get("/v1/usage").json()
        total = sum(
            d["result"]["usage"]["input_tokens"] + d["result"]["usage"]["output_tokens"] for d in done
        )
        today = usage["days"][0]
        assert today["total_tokens"] == total == usage["tokens"]["used"]
        assert today["input_tokens"] == sum(d["result"]["usage"]["input_tokens"] for d in done)
        assert today["jobs"] == len(done) and usage["tokens"]["reserved"] == 0
        assert usage["tokens"]["remaining"] == 1000 - total
        rows = stack.sql(
            "SELECT l.input_tokens + l.output_tokens FROM usage_ledger l JOIN users u ON u.id = l.user_id "
            "WHERE u.name = %s",
            usage["user"],
        )
        assert rows == [(total,)]
        # The quota is edited while the API runs: the next request sees it.
        stack.run_cli("users", "set-quota", usage["user"], "--tokens-per-day", "5000")
        assert client.post("/v1/jobs", json=job(prompt, max_new_tokens=50)).status_code == 202


def test_variant_and_input_size_limits(stack: Stack) -> None:
    key = stack.new_key("narrow", allowed_variants=["echo"], max_input_bytes=100)
    with stack.client(key) as client:
        refused = client.post("/v1/jobs", json=job("hello", "gemma-3-270m"))
        assert refused.status_code == 403
        assert refused.json()["error"]["details"] == {
            "limit": "allowed_variants", "variant": "gemma-3-270m", "allowed": ["echo"]
        }  # fmt: skip
        big = client.post("/v1/jobs", json=job("x" * 101))
        assert big.status_code == 413 and big.json()["error"]["details"]["limit"] == "max_input_bytes"
        fits = client.post("/v1/jobs", json=job("x" * 100))
        assert fits.status_code == 202
        assert wait_job(client, fits.json()["id"])["status"] == "succeeded"
        wait_released(stack, client)
