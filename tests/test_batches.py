"""The OpenAI Batch API on a real stack: the official `openai` package's flow on Gemma 3 270M,
200 lines paced by the user's concurrency quota, a cancel that keeps finished lines, lines that
cannot run, and a 50,000-line file stored in parts."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import httpx
import pytest

from tests.helpers.batches import ENDPOINT, counts, jsonl, line, oai_for, records, run_batch, wait_batch
from tests.helpers.stack import Stack

pytestmark = pytest.mark.stack


def test_openai_batch_flow_on_gemma_3_270m(stack: Stack, key: str, client: httpx.Client) -> None:
    oai = oai_for(stack, key)
    created = run_batch(oai, [line(i, model="gemma-3-270m", max_tokens=6) for i in range(6)])
    assert created.status in ("validating", "in_progress") and counts(created)[0] == 6
    done = wait_batch(oai, created.id)
    assert done.status == "completed", done
    assert counts(done) == (6, 6, 0)
    assert done.error_file_id is None and done.completed_at is not None
    out = records(oai, done.output_file_id)
    assert sorted(r["custom_id"] for r in out) == sorted(f"req-{i}" for i in range(6))
    for record in out:
        assert record["error"] is None and record["response"]["status_code"] == 200
        body = record["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == "gemma-3-270m"
        job = client.get(f"/v1/jobs/{record['response']['request_id']}").json()
        assert job["result"]["text"] == body["choices"][0]["message"]["content"]
        assert job["priority"] < 5 and job["metadata"]["batch_id"] == done.id
    assert done.id in [b.id for b in oai.batches.list()]


def test_a_batch_of_200_lines_completes(stack: Stack) -> None:
    key = stack.new_key("batch200", max_concurrent_jobs=16)
    oai = oai_for(stack, key)
    created = run_batch(oai, [line(i) for i in range(200)])
    done = wait_batch(oai, created.id)
    assert done.status == "completed"
    assert counts(done) == (200, 200, 0)
    out = records(oai, done.output_file_id)
    assert len(out) == 200 and len({r["custom_id"] for r in out}) == 200
    echoed = {r["custom_id"]: r["response"]["body"]["choices"][0]["message"]["content"] for r in out}
    assert "Request number 7." in echoed["req-7"]
    rows = stack.sql("SELECT count(*), count(DISTINCT batch_line) FROM jobs WHERE batch_id = %s", done.id)
    assert rows == [(200, 200)], "each line ran as exactly one job"


def test_cancelling_a_running_batch_keeps_its_finished_lines(stack: Stack) -> None:
    key = stack.new_key("batchcancel", max_concurrent_jobs=4)
    oai = oai_for(stack, key)
    created = run_batch(oai, [line(i, model="gemma-3-270m", max_tokens=24) for i in range(40)])
    deadline = time.monotonic() + 240
    while counts(oai.batches.retrieve(created.id))[1] < 2:
        assert time.monotonic() < deadline, "no line finished"
        time.sleep(0.3)
    cancelling = oai.batches.cancel(created.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = wait_batch(oai, created.id, {"cancelled", "completed"})
    assert done.status == "cancelled" and done.cancelled_at is not None
    finished = counts(done)[1]
    out = records(oai, done.output_file_id)
    assert finished >= 2 and len(out) == finished
    assert all(r["response"]["status_code"] == 200 for r in out)
    errors = records(oai, done.error_file_id)
    assert finished + len(errors) <= 40 and all(r["error"]["code"] == "CANCELLED" for r in errors)
    pending = stack.sql(
        "SELECT count(*) FROM jobs WHERE batch_id = %s AND status IN ('queued', 'running')", done.id
    )
    assert pending == [(0,)]


def test_a_batch_of_completions_lines(stack: Stack, key: str, client: httpx.Client) -> None:
    oai = oai_for(stack, key)
    prompt = "The capital city of Germany is Berlin. The capital city of France is"
    lines: list[dict[str, Any]] = [
        {"custom_id": f"c-{i}", "method": "POST", "url": "/v1/completions",
         "body": {"model": "gemma-3-270m", "prompt": prompt if i == 0 else f"Number {i}:", "max_tokens": 6}}
        for i in range(4)
    ]  # fmt: skip
    lines.append({**lines[1], "custom_id": "two-prompts", "body": {**lines[1]["body"], "prompt": ["a", "b"]}})
    done = wait_batch(oai, run_batch(oai, lines, "/v1/completions").id)
    assert done.status == "completed" and counts(done) == (5, 4, 1)
    out = {r["custom_id"]: r["response"]["body"] for r in records(oai, done.output_file_id)}
    assert sorted(out) == ["c-0", "c-1", "c-2", "c-3"]
    assert all(body["object"] == "text_completion" and body["choices"][0]["text"] for body in out.values())
    assert "Paris" in out["c-0"]["choices"][0]["text"]
    job = client.get(f"/v1/jobs/{out['c-0']['id'].removeprefix('cmpl-')}").json()
    assert stack.sql("SELECT input->>'prompt' FROM jobs WHERE id = %s", job["id"]) == [(prompt,)]
    assert job["metadata"]["custom_id"] == "c-0"
    [error] = records(oai, done.error_file_id)
    assert error["custom_id"] == "two-prompts" and "one prompt" in error["error"]["message"]


def test_a_batch_of_responses_lines(stack: Stack, key: str) -> None:
    oai = oai_for(stack, key)
    lines: list[dict[str, Any]] = [
        {"custom_id": f"r-{i}", "method": "POST", "url": "/v1/responses",
         "body": {"model": "echo", "input": f"answer {i}", "instructions": "Be brief."}}
        for i in range(3)
    ]  # fmt: skip
    lines.append({**lines[0], "custom_id": "streamed", "body": {**lines[0]["body"], "stream": True}})
    done = wait_batch(oai, run_batch(oai, lines, "/v1/responses").id)
    assert done.status == "completed" and counts(done) == (4, 3, 1)
    out = {r["custom_id"]: r["response"]["body"] for r in records(oai, done.output_file_id)}
    assert {k: (b["object"], b["status"], b["output"][0]["content"][0]["text"]) for k, b in out.items()} == {
        f"r-{i}": ("response", "completed", f"answer {i}") for i in range(3)
    }
    [error] = records(oai, done.error_file_id)
    assert error["custom_id"] == "streamed" and "streamed" in error["error"]["message"]


def test_lines_that_cannot_run_go_to_the_error_file(stack: Stack, key: str) -> None:
    oai = oai_for(stack, key)
    bad = [
        line(0),
        {**line(1), "method": "GET"},
        {**line(2), "url": "/v1/embeddings"},
        line(3, model="no-such-model"),
        line(4, n=2),
        {"method": "POST", "url": ENDPOINT, "body": line(5)["body"]},  # no custom_id
    ]
    done = wait_batch(oai, run_batch(oai, bad).id)
    assert done.status == "completed"
    assert counts(done) == (6, 1, 5)
    errors = {e["error"]["line"]: e for e in records(oai, done.error_file_id)}
    assert sorted(errors) == [1, 2, 3, 4, 5]
    assert errors[1]["error"]["code"] == "invalid_request"
    assert errors[3]["error"]["code"] == "UNKNOWN_VARIANT" and errors[3]["custom_id"] == "req-3"
    assert [r["custom_id"] for r in records(oai, done.output_file_id)] == ["req-0"]


def test_a_50000_line_file_is_stored_and_served_in_parts(stack: Stack, client: httpx.Client) -> None:
    data = jsonl([line(i, model="echo-held") for i in range(50_000)])
    response = client.post("/v1/files", files={"file": ("big.jsonl", data)}, data={"purpose": "batch"})
    assert response.status_code == 201, response.text
    file = response.json()
    assert file["bytes"] == len(data) and file["media"]["lines"] == 50_000 and file["media"]["parts"] >= 5
    assert file["sha256"] == hashlib.sha256(data).hexdigest()
    with client.stream("GET", f"/v1/files/{file['id']}/content") as download:
        digest = hashlib.sha256()
        for chunk in download.iter_bytes():
            digest.update(chunk)
    assert digest.hexdigest() == file["sha256"]
    batch = client.post("/v1/batches", json={"input_file_id": file["id"], "endpoint": ENDPOINT}).json()
    assert batch["request_counts"]["total"] == 50_000
    assert client.post(f"/v1/batches/{batch['id']}/cancel").json()["status"] in ("cancelling", "cancelled")
    deadline = time.monotonic() + 120
    while (ended := client.get(f"/v1/batches/{batch['id']}").json())["status"] != "cancelled":
        assert time.monotonic() < deadline, ended
        time.sleep(0.5)
    assert ended["request_counts"]["completed"] == 0
    kept = client.delete(f"/v1/files/{file['id']}")
    assert kept.status_code == 409 and kept.json()["error"]["code"] == "CONFLICT"


@pytest.mark.parametrize("body", [{"input_file_id": "file_nope", "endpoint": ENDPOINT}])
def test_batch_refusals(client: httpx.Client, body: dict[str, Any]) -> None:
    assert client.post("/v1/batches", json=body).json()["error"]["code"] == "NOT_FOUND"
    media = client.post("/v1/batches", json={"input_file_id": "x" * 65, "endpoint": ENDPOINT}).json()[
        "error"
    ]["code"]
    assert media == "VALIDATION_ERROR"
    wrong = client.post("/v1/batches", json={"input_file_id": "file_x", "endpoint": "/v1/embeddings"})
    assert wrong.status_code == 422
    not_json = client.post(
        "/v1/files", files={"file": ("x.jsonl", b'{"a": 1}\nnope\n')}, data={"purpose": "batch"}
    )
    assert not_json.status_code == 422 and "line 2" in not_json.json()["error"]["message"]
