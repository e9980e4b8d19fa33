"""`GET /v1/jobs/{id}/events`: Server-Sent Events from a real Gemma 3 270M job — statuses, text
deltas while it decodes, a resumable stream (`Last-Event-ID`)."""

from __future__ import annotations

import httpx
import pytest

from tests.helpers.http import SseEvent, sse
from tests.helpers.jobs import ESSAY
from tests.helpers.stack import Stack

pytestmark = pytest.mark.stack


def test_deltas_arrive_before_the_end_and_join_into_the_result(client: httpx.Client) -> None:
    job_id = client.post("/v1/jobs", json=ESSAY).json()["id"]
    events = list(sse(client, job_id))
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "done" and kinds.count("done") == 1
    statuses = [e["data"]["status"] for e in events if e["event"] == "status"]
    assert statuses == ["queued", "running", "succeeded"], statuses
    deltas = [e for e in events if e["event"] == "delta"]
    end = kinds.index("status", kinds.index("delta"))  # the first status after a delta
    assert events[end]["data"]["status"] == "succeeded" and len(deltas) >= 2
    job = events[-1]["data"]
    assert job["id"] == job_id and job["result"]["usage"]["output_tokens"] > 16
    assert "".join(d["data"]["text"] for d in deltas) == job["result"]["text"]
    ids = [e["id"] for e in events[:-1]]
    assert all(ids) and len(set(ids)) == len(ids)


def test_a_reconnect_with_last_event_id_resumes_without_duplicates(client: httpx.Client) -> None:
    job_id = client.post("/v1/jobs", json=ESSAY).json()["id"]
    first: list[SseEvent] = []
    for event in sse(client, job_id):  # leave while it decodes, after two deltas
        first.append(event)
        if sum(e["event"] == "delta" for e in first) == 2:
            break
    second = list(sse(client, job_id, last_event_id=first[-1]["id"]))
    assert second[-1]["event"] == "done"
    seen = [e["id"] for e in first + second if e["id"] is not None]
    assert len(seen) == len(set(seen)), "an event came twice"
    text = "".join(e["data"]["text"] for e in first + second if e["event"] == "delta")
    job = second[-1]["data"]
    assert job["status"] == "succeeded" and text == job["result"]["text"]
    # From the start again: the whole history, the same ids.
    replay = list(sse(client, job_id))
    assert [e["id"] for e in replay if e["id"]] == seen


def test_event_stream_errors(stack: Stack, client: httpx.Client) -> None:
    job_id = client.post("/v1/jobs", json={"variant": "echo", "input": {"prompt": "hi"}}).json()["id"]
    bad = client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "yesterday"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "VALIDATION_ERROR"
    with stack.client(stack.new_key("other")) as other:
        assert other.get(f"/v1/jobs/{job_id}/events").json()["error"]["code"] == "NOT_FOUND"
    assert client.get("/v1/jobs/job_nope/events").status_code == 404
    # An ended job: its history and `done` at once, then the stream closes.
    events = list(sse(client, job_id))
    assert events[-1]["event"] == "done" and events[-1]["data"]["result"]["text"]
