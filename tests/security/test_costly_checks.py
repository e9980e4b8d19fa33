"""Finding 6: the checks that cost work (a grammar's compile, a webhook's DNS lookup, inline media
decoded) run only for a request the quota would admit. A tenant that the quota refuses gets its
429 first: each request below would be a 422 had its costly check run (a grammar that does not
compile, a webhook to a private address, a truncated image)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.helpers.http import assert_envelope
from tests.helpers.jobs import image_job
from tests.helpers.media import b64, jpeg
from tests.helpers.stack import Stack

pytestmark = pytest.mark.stack

TEXT = "gemma-3-270m"
UNCOMPILABLE = {
    "type": "json_schema",
    "json_schema": {"name": "s", "schema": {"type": "string", "pattern": "(a|b"}},
}


def _costly(part: str) -> dict[str, Any]:
    """A job whose costly check refuses it: 422 once that check runs."""
    if part == "grammar":
        return {"variant": TEXT, "input": {"prompt": "Hi"}, "params": {"response_format": UNCOMPILABLE}}
    if part == "webhook":
        return {"variant": TEXT, "input": {"prompt": "Hi"}, "webhook_url": "http://10.0.0.1/hook"}
    return image_job({"data": b64(jpeg()[: len(jpeg()) // 2])})


PARTS = ["grammar", "webhook", "media"]


def test_the_costly_checks_refuse_what_the_quota_lets_in(client: httpx.Client) -> None:
    """The same requests from a tenant within its quota: each one's costly check refuses it."""
    for part in PARTS:
        assert_envelope(client.post("/v1/jobs", json=_costly(part)), 422, "VALIDATION_ERROR")


@pytest.mark.parametrize(
    ("quota", "code", "limit"),
    [
        ({"requests_per_minute": 1}, "RATE_LIMIT_EXCEEDED", "requests_per_minute"),
        ({"max_concurrent_jobs": 0}, "QUOTA_EXCEEDED", "max_concurrent_jobs"),
        ({"tokens_per_day": 8}, "QUOTA_EXCEEDED", "tokens_per_day"),
    ],
)
def test_a_request_the_quota_refuses_spends_no_costly_check(
    stack: Stack, quota: dict[str, int], code: str, limit: str
) -> None:
    with stack.client(stack.new_key("costly", **quota)) as tenant:
        # The window filled, or the day's counter made (the first admission seeds it).
        first = tenant.post(
            "/v1/jobs", json={"variant": TEXT, "input": {"prompt": "Hi"}, "params": {"max_new_tokens": 4}}
        )
        if limit == "requests_per_minute":
            assert first.status_code == 202, first.text
        else:
            assert_envelope(first, 429, code)
        for part in PARTS:
            error = assert_envelope(tenant.post("/v1/jobs", json=_costly(part)), 429, code)
            assert error["details"]["limit"] == limit, (part, error)
