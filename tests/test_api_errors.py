"""Bad input gets a clear 4xx in the one envelope — never a 500."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from api.app import create_app
from core.settings import Settings
from tests.helpers.http import assert_envelope
from tests.helpers.stack import Stack

GOOD: dict[str, Any] = {"variant": "echo", "task": "text", "input": {"prompt": "hi"}}


@pytest.mark.stack
def test_missing_and_wrong_keys_are_401(stack: Stack) -> None:
    with stack.client(None) as anonymous:
        assert_envelope(anonymous.post("/v1/jobs", json=GOOD), 401, "UNAUTHORIZED")
        assert_envelope(anonymous.get("/v1/jobs"), 401, "UNAUTHORIZED")
    with stack.client("gq_not-a-real-key") as wrong:
        assert_envelope(wrong.post("/v1/jobs", json=GOOD), 401, "UNAUTHORIZED")
        assert_envelope(wrong.get("/v1/models"), 401, "UNAUTHORIZED")
    with httpx.Client(base_url=stack.url, headers={"Authorization": "Basic abc"}) as basic:
        assert_envelope(basic.get("/v1/jobs"), 401, "UNAUTHORIZED")


@pytest.mark.stack
def test_another_users_job_and_batch_are_404(stack: Stack, client: httpx.Client) -> None:
    job = client.post("/v1/jobs", json=GOOD).json()
    request = {
        "custom_id": "a",
        "url": "/v1/chat/completions",
        "body": {"model": "echo-held", "messages": []},
    }
    upload = {"file": ("in.jsonl", (json.dumps(request) + "\n").encode())}
    file = client.post("/v1/files", files=upload, data={"purpose": "batch"}).json()
    batch = client.post("/v1/batches", json={"input_file_id": file["id"], "endpoint": "/v1/chat/completions"})
    batch_id = batch.json()["id"]
    with stack.client(stack.new_key("other")) as other:
        assert_envelope(other.get(f"/v1/jobs/{job['id']}"), 404, "NOT_FOUND")
        assert_envelope(other.post(f"/v1/jobs/{job['id']}/cancel"), 404, "NOT_FOUND")
        assert_envelope(other.get(f"/v1/jobs/{job['id']}/events"), 404, "NOT_FOUND")
        assert job["id"] not in [j["id"] for j in other.get("/v1/jobs").json()["data"]]
        assert_envelope(other.get(f"/v1/batches/{batch_id}"), 404, "NOT_FOUND")
        assert_envelope(other.post(f"/v1/batches/{batch_id}/cancel"), 404, "NOT_FOUND")
        assert batch_id not in [b["id"] for b in other.get("/v1/batches").json()["data"]]
        assert_envelope(other.get(f"/v1/files/{file['id']}/content"), 404, "NOT_FOUND")
        other_file = other.post("/v1/files", files=upload, data={"purpose": "batch"}).json()
        body = {"input_file_id": file["id"], "endpoint": "/v1/chat/completions"}
        assert_envelope(other.post("/v1/batches", json=body), 404, "NOT_FOUND")  # not theirs to run
        assert other_file["id"] != file["id"]
    assert_envelope(client.get("/v1/jobs/job_doesnotexist"), 404, "NOT_FOUND")
    assert_envelope(client.get("/v1/batches/batch_doesnotexist"), 404, "NOT_FOUND")
    assert client.post(f"/v1/batches/{batch_id}/cancel").status_code == 200


@pytest.mark.stack
@pytest.mark.parametrize(
    ("body", "code", "where"),
    [
        ({**GOOD, "variant": "gemma-9-nope"}, "UNKNOWN_VARIANT", "gemma-9-nope"),
        ({**GOOD, "input": {"messages": []}}, "VALIDATION_ERROR", "messages"),
        ({**GOOD, "input": {"messages": [{"role": "wizard", "content": "hi"}]}}, "VALIDATION_ERROR", "role"),
        ({**GOOD, "input": {"messages": [{"role": "user", "content": ""}]}}, "VALIDATION_ERROR", "no text"),
        ({**GOOD, "input": {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}},
         "VALIDATION_ERROR",
         "exactly one"),
        ({**GOOD, "input": {}}, "VALIDATION_ERROR", "exactly one"),
        ({**GOOD, "params": {"max_new_tokens": 100_000}}, "VALIDATION_ERROR", "max_new_tokens"),
        ({**GOOD, "variant": "gemma-3-270m", "params": {"max_new_tokens": 513}}, "VALIDATION_ERROR",
         "max_new_tokens"),
        ({**GOOD, "params": {"temperature": -1}}, "VALIDATION_ERROR", "temperature"),
        ({**GOOD, "params": {"nonsense": 1}}, "VALIDATION_ERROR", "nonsense"),
        ({**GOOD, "task": "image"}, "VALIDATION_ERROR", "does not serve"),
        ({**GOOD, "task": "video"}, "VALIDATION_ERROR", "task"),
        ({**GOOD, "priority": 11}, "VALIDATION_ERROR", "priority"),
        ({"input": "not an object"}, "VALIDATION_ERROR", "input"),
        ([1, 2, 3], "VALIDATION_ERROR", ""),
    ],
)  # fmt: skip
def test_bad_job_bodies_are_422(client: httpx.Client, body: Any, code: str, where: str) -> None:
    error = assert_envelope(client.post("/v1/jobs", json=body), 422, code)
    assert where in (error["message"] + str(error["details"]))


@pytest.mark.stack
def test_malformed_json_is_422(client: httpx.Client) -> None:
    response = client.post(
        "/v1/jobs", content=b'{"variant": "echo", ', headers={"Content-Type": "application/json"}
    )
    assert_envelope(response, 422, "VALIDATION_ERROR")
    not_utf8 = client.post("/v1/jobs", content=b"\xff\xfe", headers={"Content-Type": "application/json"})
    assert_envelope(not_utf8, 422, "VALIDATION_ERROR")


@pytest.mark.stack
def test_bad_query_parameters_are_422(client: httpx.Client) -> None:
    assert_envelope(client.get("/v1/jobs", params={"status": "sleeping"}), 422, "VALIDATION_ERROR")
    assert_envelope(client.get("/v1/jobs", params={"cursor": "!!!"}), 422, "VALIDATION_ERROR")
    assert_envelope(client.get("/v1/jobs", params={"limit": 0}), 422, "VALIDATION_ERROR")
    assert_envelope(client.get("/v1/jobs/job_x", params={"wait": 61}), 422, "VALIDATION_ERROR")


@pytest.mark.stack
def test_unknown_route_and_method_use_the_envelope(client: httpx.Client) -> None:
    assert_envelope(client.get("/v1/nothing-here"), 404, "NOT_FOUND")
    assert_envelope(client.delete("/v1/jobs"), 405, "METHOD_NOT_ALLOWED")


@pytest.mark.unit
def test_openapi_documents_every_error_shape() -> None:
    spec = create_app(Settings()).openapi()  # the document /openapi.json serves, built in-process
    assert "ErrorResponse" in spec["components"]["schemas"]
    submit = spec["paths"]["/v1/jobs"]["post"]["responses"]
    for status in ("202", "401", "422", "503"):
        assert status in submit
    for status in ("401", "422"):
        ref = submit[status]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorResponse")
    assert "JobOut" in submit["202"]["content"]["application/json"]["schema"]["$ref"]
    for path in ("/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/models"):
        for method in spec["paths"][path].values():
            assert "401" in method["responses"]


@pytest.mark.stack
def test_nul_characters_are_refused_not_500(client: httpx.Client) -> None:
    for body in (
        {**GOOD, "input": {"prompt": "a\u0000b"}},
        {**GOOD, "metadata": {"k": "v\u0000"}},
        {**GOOD, "params": {"stop": ["\u0000"]}},
        {**GOOD, "input": {"messages": [{"role": "user", "content": [{"type": "text", "text": "\u0000"}]}]}},
    ):
        assert_envelope(client.post("/v1/jobs", json=body), 422, "VALIDATION_ERROR")
    assert client.get("/v1/jobs/job_a%00b").status_code in (404, 422)
    assert client.get("/v1/jobs", params={"variant": "a\u0000"}).status_code == 422
    assert client.get(
        "/v1/jobs", params={"cursor": "WyIyMDI2LTAxLTAxVDAwOjAwOjAwKzAwOjAwIiwgImFcdTAwMDAiXQ"}
    ).status_code in (
        200,
        422,
    )


@pytest.mark.stack
@pytest.mark.parametrize(
    ("messages", "why"),
    [
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "may only come first"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message"),
        ([{"role": "system", "content": "be brief"}], "last message"),
    ],
)  # fmt: skip
def test_message_order_is_checked(client: httpx.Client, messages: list[dict[str, str]], why: str) -> None:
    error = assert_envelope(client.post("/v1/jobs", json={**GOOD, "input": {"messages": messages}}), 422,
                            "VALIDATION_ERROR")  # fmt: skip
    assert why in error["message"]


@pytest.mark.stack
def test_input_far_over_the_token_cap_is_413(client: httpx.Client) -> None:
    long = "word " * 6000  # 30,000 characters per message, within the per-field cap
    messages = [{"role": "user", "content": long}, {"role": "assistant", "content": long},
                {"role": "user", "content": long}]  # fmt: skip
    error = assert_envelope(client.post("/v1/jobs", json={**GOOD, "input": {"messages": messages}}), 413,
                            "PAYLOAD_TOO_LARGE")  # fmt: skip
    assert error["details"]["max_input_tokens"] > 0


@pytest.mark.stack
def test_variant_nobody_can_run_is_503(client: httpx.Client) -> None:
    body = {"variant": "gemma-3-4b-it", "task": "text", "input": {"prompt": "hi"}}
    error = assert_envelope(client.post("/v1/jobs", json=body), 503, "UNAVAILABLE")
    assert "google/gemma-3-4b-it" in error["message"]


@pytest.mark.stack
def test_idempotency_key_with_another_body_is_409(client: httpx.Client) -> None:
    first = client.post("/v1/jobs", json=GOOD, headers={"Idempotency-Key": "same-key"})
    assert first.status_code == 202
    other = client.post(
        "/v1/jobs", json={**GOOD, "input": {"prompt": "different"}}, headers={"Idempotency-Key": "same-key"}
    )
    assert_envelope(other, 409, "CONFLICT")
