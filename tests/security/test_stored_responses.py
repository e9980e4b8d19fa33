"""What a tenant makes the system keep counts against that tenant: a stored response's input is
bounded per field, counted in its owner's storage quota beside their files, and expires with the
files' retention; inline media stored as the tenant's files pass the storage check uploads do."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from tests.helpers.jobs import image_job
from tests.helpers.media import b64, png
from tests.helpers.stack import Stack

pytestmark = pytest.mark.stack


def assistant_turn(annotations: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "model": "echo",
        "input": [
            {"role": "user", "content": "hello"},
            {
                "role": "assistant",
                "content": [{"type": "output_text", "text": "hi", "annotations": annotations}],
            },
            {"role": "user", "content": "and again"},
        ],
        "background": True,
    }


def stored_bytes(client: httpx.Client) -> int:
    return int(client.get("/v1/usage").json()["storage"]["used_bytes"])


def test_megabytes_of_annotations_are_422(client: httpx.Client) -> None:
    huge = [{"type": "url_citation", "url": "https://example.com/" + "a" * 4096} for _ in range(1024)]
    response = client.post("/v1/responses", json=assistant_turn(huge))
    assert response.status_code == 422, response.text[:300]
    assert stored_bytes(client) == 0


def test_a_stored_response_counts_in_storage_until_deleted(client: httpx.Client) -> None:
    notes = [{"type": "note", "text": "x" * 2000} for _ in range(4)]
    response = client.post("/v1/responses", json=assistant_turn(notes))
    assert response.status_code == 200, response.text
    kept = stored_bytes(client)
    assert kept > 8000, kept
    assert client.delete(f"/v1/responses/{response.json()['id']}").status_code == 200
    assert stored_bytes(client) == 0


def test_a_response_past_the_storage_quota_is_429(stack: Stack) -> None:
    with stack.client(stack.new_key("small", max_storage_bytes=5000)) as client:
        notes = [{"type": "note", "text": "x" * 2000} for _ in range(4)]
        response = client.post("/v1/responses", json=assistant_turn(notes))
        assert response.status_code == 429, response.text
        assert response.json()["error"]["details"]["limit"] == "max_storage_bytes"
        small = client.post("/v1/responses", json={"model": "echo", "input": "hi", "background": True})
        assert small.status_code == 200, small.text


def test_an_expired_response_is_404_and_deleted(stack: Stack, client: httpx.Client) -> None:
    response = client.post("/v1/responses", json={"model": "echo", "input": "hi", "background": True})
    assert response.status_code == 200, response.text
    rid = response.json()["id"]
    assert stack.sql("SELECT expires_at > now() + interval '29 days' FROM responses WHERE id = %s", rid) == [
        (True,)
    ]
    stack.sql("UPDATE responses SET expires_at = now() - interval '1 second' WHERE id = %s", rid)
    assert client.get(f"/v1/responses/{rid}").status_code == 404
    assert stored_bytes(client) == 0
    deadline = time.monotonic() + 30
    while stack.sql("SELECT 1 FROM responses WHERE id = %s", rid):
        assert time.monotonic() < deadline, "the reconciler did not delete the expired response"
        time.sleep(0.5)


def test_inline_media_past_the_storage_quota_is_429(stack: Stack) -> None:
    with stack.client(stack.new_key("media", max_storage_bytes=100)) as client:
        response = client.post("/v1/jobs", json=image_job({"data": b64(png())}))
        assert response.status_code == 429, response.text
        assert response.json()["error"]["details"]["limit"] == "max_storage_bytes"
        assert client.get("/v1/jobs").json()["data"] == []
