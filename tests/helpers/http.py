"""Reading the API's answers: the one error envelope, and Server-Sent Events."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

SseEvent = dict[str, Any]  # {"id": str | None, "event": str, "data": dict}


def assert_envelope(response: Any, status: int, code: str) -> dict[str, Any]:
    """`response`: an httpx (or TestClient) response. Returns its `error` object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["details"], dict)
    return body["error"]  # type: ignore[no-any-return]


def sse(client: httpx.Client, job_id: str, last_event_id: str | None = None) -> Iterator[SseEvent]:
    """The events of one connection to a job's event stream, parsed as the SSE spec says
    (comments skipped)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=120) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        event: dict[str, str] = {}
        for line in response.iter_lines():
            if not line:
                if "data" in event:
                    data = json.loads(event["data"])
                    yield {"id": event.get("id"), "event": event.get("event", "message"), "data": data}
                event = {}
            elif not line.startswith(":"):
                field, _, text = line.partition(":")
                event[field] = text[1:] if text.startswith(" ") else text
