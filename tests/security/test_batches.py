"""Hostile batches: lines PostgreSQL cannot store, lines nested beyond any parser, and a quota
that refuses a line — none of them may stall another user's batch or spin the runner."""

from __future__ import annotations

import time
from typing import Any, Final

import pytest

from tests.helpers.batches import jsonl, line, oai_for, records, wait_batch
from tests.helpers.procs import cpu_seconds
from tests.helpers.stack import Stack

pytestmark = pytest.mark.stack

TOOL_WITH_NUL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "parameters": {"type": "object", "properties": {"q": {"type": "string", "description": "a\u0000b"}}},
    },
}
DEEP = 100_000
ENDPOINT: Final = "/v1/chat/completions"


def deep_line() -> bytes:
    head = b'{"custom_id": "deep", "method": "POST", "url": "/v1/chat/completions", "body": '
    return head + b"[" * DEEP + b"]" * DEEP + b"}"


def schema(properties: int, description: int) -> dict[str, Any]:
    strings = {f"p{i}": {"type": "string", "description": "x" * description} for i in range(properties)}
    return {"type": "object", "properties": strings}


def with_tool(tool: dict[str, Any]) -> dict[str, Any]:
    return {"variant": "echo", "input": {"prompt": "hi", "tools": [tool]}}


def test_unstorable_lines_become_line_errors_and_stall_no_one(stack: Stack) -> None:
    a, b = oai_for(stack, stack.new_key("batch-a")), oai_for(stack, stack.new_key("batch-b"))
    nul_id = line(1) | {"custom_id": "bad\u0000id", "body": {"model": "echo"}}  # invalid, with a NUL
    nul_tool = line(2, tools=[TOOL_WITH_NUL])
    lines: list[dict[str, Any] | bytes] = [line(0), nul_id, nul_tool, deep_line(), line(4)]
    hostile = jsonl(lines)
    upload = a.files.create(file=("hostile.jsonl", hostile), purpose="batch")
    first = a.batches.create(input_file_id=upload.id, endpoint=ENDPOINT, completion_window="24h")

    mine = b.files.create(file=("one.jsonl", jsonl([line(0)])), purpose="batch")
    other = b.batches.create(input_file_id=mine.id, endpoint=ENDPOINT, completion_window="24h")
    started = time.monotonic()
    done = wait_batch(b, other.id, timeout=60)
    assert done.status == "completed" and time.monotonic() - started < 60

    ended = wait_batch(a, first.id, timeout=60)
    assert ended.status == "completed", ended
    assert sorted(r["custom_id"] for r in records(a, ended.output_file_id)) == ["req-0", "req-4"]
    errors = {r["error"]["line"]: r for r in records(a, ended.error_file_id)}
    assert sorted(errors) == [1, 2, 3]
    assert errors[1]["custom_id"] is None and "custom_id" in errors[1]["error"]["message"]
    assert errors[2]["custom_id"] == "req-2" and "NUL" in errors[2]["error"]["message"]
    assert errors[3]["error"]["code"] == "invalid_json" and "deep" in errors[3]["error"]["message"]


def test_a_line_a_quota_refuses_waits_without_spinning(stack: Stack) -> None:
    key = stack.new_key("batch-refused", max_concurrent_jobs=1)
    oai = oai_for(stack, key)
    # echo-held jobs are never run: the first line's job keeps the one slot, the second waits.
    held = jsonl([line(i, model="echo-held") for i in range(3)])
    upload = oai.files.create(file=("held.jsonl", held), purpose="batch")
    batch = oai.batches.create(input_file_id=upload.id, endpoint=ENDPOINT, completion_window="24h")
    api = stack.processes[0].pid
    deadline = time.monotonic() + 30
    while not stack.sql("SELECT 1 FROM jobs WHERE batch_id = %s", batch.id):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(3)  # past the first quick retries
    before = cpu_seconds(api)
    time.sleep(6)
    spent = cpu_seconds(api) - before
    assert spent < 0.6, f"the API spent {spent:.2f} s of CPU in 6 s on a batch that waits for its quota"
    assert stack.sql("SELECT count(*) FROM jobs WHERE batch_id = %s", batch.id)[0][0] == 1
    oai.batches.cancel(batch.id)
    assert wait_batch(oai, batch.id, {"cancelled"}, timeout=60).status == "cancelled"


def test_a_deeply_nested_request_body_is_a_4xx(stack: Stack, key: str) -> None:
    body = b'{"input": {"prompt": "x"}, "metadata": ' + b"[" * DEEP + b"]" * DEEP + b"}"
    with stack.client(key) as c:
        response = c.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
        assert 400 <= response.status_code < 500, response.text
        assert response.json()["error"]["code"]
        tool = {"input": {"prompt": "x", "tools": [TOOL_WITH_NUL]}, "variant": "echo"}
        response = c.post("/v1/jobs", json=tool)
        assert response.status_code == 422 and "NUL" in response.text


def test_tool_schemas_are_capped_and_count_toward_the_input(stack: Stack) -> None:
    key = stack.new_key("tools-size", max_input_bytes=4000)
    tool = {"type": "function", "function": {"name": "f", "parameters": schema(60, 60)}}
    with stack.client(key) as c:
        counted = c.post("/v1/jobs", json=with_tool(tool))
        assert counted.status_code == 413 and counted.json()["error"]["details"]["limit"] == "max_input_bytes"
        nested: dict[str, object] = {"type": "object"}
        for _ in range(40):
            nested = {"type": "object", "properties": {"n": nested}}
        deep_tool = {"type": "function", "function": {"name": "f", "parameters": nested}}
        refused = c.post("/v1/jobs", json=with_tool(deep_tool))
        assert refused.status_code == 422 and "nests deeper" in refused.text
        huge_tool = {"type": "function", "function": {"name": "f", "parameters": schema(64, 500)}}
        with stack.client(stack.new_key()) as roomy:
            refused = roomy.post("/v1/jobs", json=with_tool(huge_tool))
        assert refused.status_code == 422 and "bytes of JSON" in refused.text
