"""Every string a tenant sends is text, or the request is refused with a 422: lone UTF-16
surrogates (JSON's "\\ud800") and NUL on every JSON route, non-ASCII digits in a query, and a
batch line holding one is that line's error while its batch completes."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.helpers.batches import counts, line, oai_for, records, run_batch, wait_batch
from tests.helpers.jobs import text_job
from tests.helpers.stack import Stack

pytestmark = pytest.mark.stack

LONE = "\ud800"  # json.dumps writes it as the escape "\ud800"
TOOL = {"type": "function", "function": {"name": "look", "parameters": {"type": "object", "properties": {
    "q": {"type": "string", "description": LONE}}}}}  # fmt: skip
ROUTES: list[tuple[str, str, dict[str, Any]]] = [
    ("moderation input", "/v1/moderations", {"input": f"hello {LONE}"}),
    (
        "a job's tool parameters",
        "/v1/jobs",
        text_job("hi", variant="echo") | {"input": {"prompt": "hi", "tools": [TOOL]}},
    ),
    ("a job's metadata", "/v1/jobs", text_job("hi", variant="echo") | {"metadata": {"k": LONE}}),
    ("a job's metadata key", "/v1/jobs", text_job("hi", variant="echo") | {"metadata": {LONE: "v"}}),
    (
        "a chat message",
        "/v1/chat/completions",
        {"model": "echo", "messages": [{"role": "user", "content": LONE}]},
    ),
    ("a completion prompt", "/v1/completions", {"model": "echo", "prompt": f"a {LONE} b"}),
    ("a response's input", "/v1/responses", {"model": "echo", "input": LONE}),
    ("NUL in a response's input", "/v1/responses", {"model": "echo", "input": "a\x00b"}),
]


def post_raw(client: httpx.Client, path: str, body: dict[str, Any]) -> httpx.Response:
    raw = json.dumps(body)  # ensure_ascii: a lone surrogate goes out as its escape
    return client.post(path, content=raw.encode(), headers={"content-type": "application/json"})


@pytest.mark.parametrize(("what", "path", "body"), ROUTES, ids=[r[0] for r in ROUTES])
def test_a_string_that_is_not_text_is_422(
    client: httpx.Client, what: str, path: str, body: dict[str, Any]
) -> None:
    response = post_raw(client, path, body)
    assert response.status_code == 422, (what, response.status_code, response.text)
    error = response.json()["error"]
    assert error["code"] == "VALIDATION_ERROR" and (
        "surrogate" in error["message"] or "NUL" in error["message"]
    )


def test_a_surrogate_pair_is_text(client: httpx.Client) -> None:
    response = post_raw(
        client, "/v1/completions", {"model": "echo", "prompt": "smile \U0001f600", "max_tokens": 4}
    )
    assert response.status_code == 200, response.text


def test_a_window_in_non_ascii_digits_is_422(client: httpx.Client) -> None:
    for window in ("\u00b2h", "\u0661\u0662h", "\u00b2"):  # superscript two; Arabic-Indic 1 and 2
        response = client.get("/v1/metrics/summary", params={"window": window})
        assert response.status_code == 422, (window, response.text)
        assert response.json()["error"]["code"] == "VALIDATION_ERROR"


def test_a_batch_line_that_is_not_text_is_a_line_error_its_batch_completes(stack: Stack, key: str) -> None:
    oai = oai_for(stack, key)
    bad = line(1) | {"body": line(1)["body"] | {"messages": [{"role": "user", "content": LONE}]}}
    lone_id = line(2) | {"custom_id": f"id-{LONE}"}
    done = wait_batch(oai, run_batch(oai, [line(0), bad, lone_id]).id, timeout=120)
    assert done.status == "completed", done
    assert counts(done) == (3, 1, 2)
    errors = {e["error"]["line"]: e for e in records(oai, done.error_file_id)}
    assert sorted(errors) == [1, 2]
    assert errors[1]["custom_id"] == "req-1" and "surrogate" in errors[1]["error"]["message"]
    assert errors[2]["custom_id"] is None and "surrogate" in errors[2]["error"]["message"]
    assert [r["custom_id"] for r in records(oai, done.output_file_id)] == ["req-0"]
