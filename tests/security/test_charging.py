"""Work done is charged to whoever caused it: a job that times out mid-reply is charged the tokens
it read and generated, in /v1/usage, the usage ledger and its metrics, once."""

from __future__ import annotations

import httpx
import pytest

from tests.helpers.jobs import text_job
from tests.helpers.stack import Stack, wait_job

pytestmark = pytest.mark.stack

STORY = "Write a very long story about a lighthouse keeper, the sea and the ships that pass."


def ledger(stack: Stack, job_id: str) -> tuple[int, int]:
    rows = stack.sql(
        "SELECT coalesce(sum(l.input_tokens), 0), coalesce(sum(l.output_tokens), 0) FROM usage_ledger l"
        " WHERE l.user_id = (SELECT user_id FROM jobs WHERE id = %s)",
        job_id,
    )
    return int(rows[0][0]), int(rows[0][1])  # type: ignore[call-overload]


def test_a_job_that_times_out_is_charged_what_it_read_and_generated(
    stack: Stack, client: httpx.Client
) -> None:
    response = client.post("/v1/jobs", json=text_job(STORY, max_new_tokens=400, timeout_s=2))
    assert response.status_code == 202, response.text
    job = wait_job(client, response.json()["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "TIMEOUT", job
    read, generated = ledger(stack, job["id"])
    assert read >= 10 and generated > 0, (read, generated)  # the prompt, and the reply so far
    assert generated < 400
    assert job["metrics"]["input_tokens"] == read and job["metrics"]["output_tokens"] == generated
    assert client.get("/v1/usage").json()["tokens"]["used"] == read + generated
