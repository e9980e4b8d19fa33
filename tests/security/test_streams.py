"""A request that follows many jobs counts as many streams: a streamed completion of 16 prompts
holds 16 blocking Redis reads, so it takes 16 of its caller's places (and of the process's), and
a tenant's few such requests cannot take the API's Redis pool from everyone."""

from __future__ import annotations

import time

import pytest

from tests.helpers.stack import Stack

pytestmark = pytest.mark.stack

HELD = "echo-held"  # no worker serves it: its jobs stay queued and their streams open


def test_a_streamed_completion_of_16_prompts_takes_16_stream_places(stack: Stack) -> None:
    with stack.client(stack.new_key("fanout", max_concurrent_jobs=100)) as client:
        many = {"model": HELD, "prompt": [f"prompt {i}" for i in range(16)], "max_tokens": 4, "stream": True}
        with client.stream("POST", "/v1/completions", json=many) as first:
            assert first.status_code == 200
            one = {"model": HELD, "prompt": "one more", "max_tokens": 4, "stream": True}
            refused = client.post("/v1/completions", json=one)
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["details"]["limit"] == "max_streams_per_user"
            assert refused.headers["retry-after"]
        # The stream closed: its places are back, once the API has seen the client go (it learns
        # of a closed connection a moment later, from the server, not from this request).
        deadline = time.monotonic() + 10
        while True:
            with client.stream("POST", "/v1/completions", json=one) as again:
                if again.status_code == 200 or time.monotonic() > deadline:
                    assert again.status_code == 200, again.read()
                    break
            time.sleep(0.1)


def test_a_fan_out_past_the_cap_is_refused_before_anything_is_queued(stack: Stack) -> None:
    with stack.client(stack.new_key("fanout2", max_concurrent_jobs=100)) as client:
        one = {"model": HELD, "prompt": "first", "max_tokens": 4, "stream": True}
        with client.stream("POST", "/v1/completions", json=one) as first:
            assert first.status_code == 200
            many = {"model": HELD, "prompt": [f"p {i}" for i in range(16)], "max_tokens": 4, "stream": True}
            refused = client.post("/v1/completions", json=many)
            assert refused.status_code == 429, refused.text
        queued = client.get("/v1/jobs", params={"limit": 100}).json()["data"]
        assert len(queued) == 1, [j["id"] for j in queued]
