"""Quotas after Redis loses everything: the jobs in flight get their slots and reservations back
from PostgreSQL, so the concurrency cap and the day's tokens are exact, not reset to zero."""

from __future__ import annotations

import httpx
import pytest

from core.quotas import estimate_input_tokens
from tests.helpers.servers import drop_namespace
from tests.helpers.stack import Stack

# Redis loses everything the deployment keeps in it: a fault, injected into the session's stack.
pytestmark = pytest.mark.faults

PROMPT = "hold"


def reservation(max_new_tokens: int) -> int:
    return max_new_tokens + estimate_input_tokens(text_bytes=len(PROMPT), images=0, audio_seconds=0)


def held(c: httpx.Client, max_new_tokens: int = 100) -> httpx.Response:
    body = {"variant": "echo-held", "input": {"prompt": PROMPT}, "params": {"max_new_tokens": max_new_tokens}}
    return c.post("/v1/jobs", json=body)


def test_after_redis_is_emptied_the_caps_are_exact(stack: Stack) -> None:
    per_job = reservation(100)
    per_day = 4 * per_job + 50
    key = stack.new_key("rebuilt", max_concurrent_jobs=4, tokens_per_day=per_day)
    with stack.client(key) as c:
        jobs = [held(c).json()["id"] for _ in range(4)]  # never run: they hold their slots
        assert held(c).status_code == 429
        # Everything the deployment keeps in Redis is gone (its namespace: a FLUSHALL of a Redis
        # it does not share with other test runs).
        drop_namespace(stack.redis_url, stack.namespace)
        over = held(c)
        assert over.status_code == 429 and over.json()["error"]["details"]["limit"] == "max_concurrent_jobs"
        assert c.post(f"/v1/jobs/{jobs[0]}/cancel").status_code == 200
        assert c.post(f"/v1/jobs/{jobs[1]}/cancel").status_code == 200
        # Two in flight: twice per_job of the day's tokens reserved; room for exactly the rest.
        room = per_day - 2 * per_job
        too_big = held(c, max_new_tokens=room - reservation(0) + 1)
        assert too_big.status_code == 429, too_big.text
        assert too_big.json()["error"]["details"]["limit"] == "tokens_per_day"
        fits = held(c, max_new_tokens=room - reservation(0))
        assert fits.status_code == 202, fits.text
        usage = c.get("/v1/usage").json()
        assert usage["concurrent_jobs"]["active"] == 3 and usage["tokens"]["remaining"] == 0
        for job_id in [*jobs[2:], fits.json()["id"]]:
            c.post(f"/v1/jobs/{job_id}/cancel")
