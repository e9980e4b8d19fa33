"""Webhooks from a real stack to a receiver in this process: Standard Webhooks signatures checked
with the `standardwebhooks` package, retries with backoff, every attempt in the delivery log,
private targets refused at submission."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime

import httpx
import openai
import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from tests.helpers.stack import Stack, wait_job
from tests.helpers.webhooks import Receiver

pytestmark = pytest.mark.stack


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_signed_delivery_retried_until_the_receiver_takes_it(
    client: httpx.Client, receiver: Receiver
) -> None:
    secret = client.get("/v1/webhooks/settings").json()["secret"]
    assert secret.startswith("whsec_")
    receiver.script["/flaky"] = [500, 503]
    body = {"variant": "echo", "input": {"prompt": "ping"}, "webhook_url": receiver.url("/flaky")}
    job = wait_job(client, client.post("/v1/jobs", json=body).json()["id"])
    assert job["status"] == "succeeded"
    requests = receiver.wait("/flaky", 3)
    webhook = Webhook(secret)
    for headers, raw in requests:
        event = webhook.verify(raw, headers)  # raises unless signed with the user's secret
        assert event["type"] == "job.succeeded" and event["data"]["id"] == job["id"]
        assert event["data"]["result"]["text"] == job["result"]["text"]
        with pytest.raises(WebhookVerificationError):
            webhook.verify(raw + b" ", headers)
    assert len({h["webhook-id"] for h, _ in requests}) == 1, "retries keep the message id"
    deadline = time.monotonic() + 30
    while True:
        log = client.get("/v1/webhooks/deliveries", params={"job_id": job["id"]}).json()["data"]
        if (log and log[0]["status"] == "delivered") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    (delivery,) = log
    assert delivery["status"] == "delivered" and delivery["id"] == requests[0][0]["webhook-id"]
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 503, 200]
    assert delivery["event"] == "job.succeeded" and delivery["delivered_at"] is not None
    # The backoff doubled: the third attempt came at least 0.3 + 0.6 s after the first.
    first, _, third = (a["at"] for a in delivery["attempts"])
    assert _seconds(third) - _seconds(first) >= 0.9


def test_private_loopback_and_link_local_targets_are_refused(stack: Stack, client: httpx.Client) -> None:
    for url in ("http://10.0.0.1/", "http://169.254.169.254/", "http://[::1]/", "http://192.168.1.5/x",
                "ftp://example.com/", "http://user:pw@127.0.0.1/"):  # fmt: skip
        body = {"variant": "echo", "input": {"prompt": "x"}, "webhook_url": url}
        response = client.post("/v1/jobs", json=body)
        assert response.status_code == 422, (url, response.text)
        assert response.json()["error"]["code"] == "VALIDATION_ERROR"
        assert client.put("/v1/webhooks/settings", json={"default_url": url}).status_code == 422
    assert client.get("/v1/usage").json()["concurrent_jobs"]["active"] == 0  # nothing was admitted


def test_default_url_gets_the_cancelled_event(client: httpx.Client, receiver: Receiver) -> None:
    settings = client.put("/v1/webhooks/settings", json={"default_url": receiver.url("/default")}).json()
    assert settings["default_url"] == receiver.url("/default")
    queued = client.post("/v1/jobs", json={"variant": "echo-held", "input": {"prompt": "never runs"}}).json()
    assert client.post(f"/v1/jobs/{queued['id']}/cancel").json()["status"] == "cancelled"
    ((headers, raw),) = receiver.wait("/default", 1)
    event = Webhook(settings["secret"]).verify(raw, headers)
    assert event["type"] == "job.cancelled" and event["data"]["id"] == queued["id"]
    assert client.put("/v1/webhooks/settings", json={"default_url": None}).json()["default_url"] is None


def _seconds(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def test_a_batch_reports_its_end(client: httpx.Client, receiver: Receiver) -> None:
    secret = client.get("/v1/webhooks/settings").json()["secret"]
    lines = [
        {"custom_id": f"c{i}", "url": "/v1/chat/completions", "body": {"model": "echo", "messages": [
            {"role": "user", "content": f"line {i}"}]}}
        for i in range(2)
    ]  # fmt: skip
    upload = {"file": ("in.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode())}
    file = client.post("/v1/files", files=upload, data={"purpose": "batch"}).json()
    body = {
        "input_file_id": file["id"],
        "endpoint": "/v1/chat/completions",
        "webhook_url": receiver.url("/b"),
    }
    batch = client.post("/v1/batches", json=body).json()
    ((headers, raw),) = receiver.wait("/b", 1, timeout=120)
    event = Webhook(secret).verify(raw, headers)
    assert event["type"] == "batch.completed" and event["data"]["id"] == batch["id"]
    assert event["data"]["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
    log = client.get("/v1/webhooks/deliveries", params={"batch_id": batch["id"]}).json()["data"]
    assert [d["event"] for d in log] == ["batch.completed"] and log[0]["batch_id"] == batch["id"]
    refused = client.post("/v1/batches", json=body | {"webhook_url": "http://169.254.169.254/"})
    assert refused.status_code == 422


def test_a_response_reports_its_end_in_openais_names(stack: Stack, receiver: Receiver) -> None:
    key = stack.new_key("responses-hooks")
    with stack.client(key) as client:
        default = {"default_url": receiver.url("/responses")}
        secret = client.put("/v1/webhooks/settings", json=default).json()["secret"]
    oai = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0, timeout=60)
    done = oai.responses.create(model="echo", input="one two three", background=True)
    cut = oai.responses.create(model="echo", input="one two three", max_output_tokens=1, background=True)
    events = {}
    for headers, raw in receiver.wait("/responses", 2):
        event = Webhook(secret).verify(raw, headers)
        events[event["data"]["id"]] = event
    assert events[done.id]["type"] == "response.completed"
    assert events[done.id]["data"]["output_text"] == "one two three"
    assert events[cut.id]["type"] == "response.incomplete"
