"""A tenant's own LoRA adapter, end to end: trained here with PEFT on the 270M (one fixed answer to
one fixed prompt), uploaded as tenant A, then asked for through the `openai` package as
`gemma-3-270m:<name>` (it gives the taught answer, the base model does not); tenant B gets 404
for it, asking by name or by id, and does not see it in /v1/models."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.helpers.adapters import TAUGHT_ANSWER, TAUGHT_PROMPT, Taught, packed
from tests.helpers.http import assert_envelope
from tests.helpers.stack import Stack

pytestmark = pytest.mark.stack

BASE = "gemma-3-270m"


@pytest.fixture
def other(stack: Stack) -> Iterator[httpx.Client]:
    with stack.client(stack.new_key("tenant-b")) as c:
        yield c


def test_a_tenants_adapter_gives_its_taught_answer_and_no_other_tenant_may_use_it(
    stack: Stack, client: httpx.Client, key: str, other: httpx.Client, taught: Taught
) -> None:
    name = taught.folder.name
    assert taught.seconds < 60, f"training took {taught.seconds:.0f} s"
    files = {"file": (f"{name}.tar.gz", packed(taught.folder), "application/gzip")}
    created = client.post("/v1/adapters", files=files, data={"name": name, "base": BASE})
    assert created.status_code == 201, created.text
    adapter_id = created.json()["id"]

    oa = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0, timeout=300)
    tuned = oa.completions.create(model=f"{BASE}:{name}", prompt=TAUGHT_PROMPT, max_tokens=12, temperature=0)
    assert tuned.choices[0].text.startswith(TAUGHT_ANSWER), tuned.choices[0].text
    plain = oa.completions.create(model=BASE, prompt=TAUGHT_PROMPT, max_tokens=12, temperature=0)
    assert "marigold" not in plain.choices[0].text, plain.choices[0].text
    job_id = tuned.id.removeprefix("cmpl-")
    assert stack.sql("SELECT variant, params->>'adapter' FROM jobs WHERE id = %s", job_id) == [
        (BASE, adapter_id)
    ]

    # The owner sees it on the variant, held by the worker that ran it, and that worker's cache.
    deadline = time.monotonic() + 30
    while True:
        model = next(m for m in client.get("/v1/models").json()["data"] if m["id"] == BASE)
        listed = [a for a in model["adapters"] if a["id"] == adapter_id]
        if listed and listed[0]["loaded_on"]:
            break
        assert time.monotonic() < deadline, model
        time.sleep(1)
    assert listed[0]["name"] == name and listed[0]["owned"]
    caches = [w["adapter_cache"] for w in model["workers"] if w["worker"] in listed[0]["loaded_on"]]
    assert caches and caches[0]["adapters"] >= 1 and 0 < caches[0]["bytes"] <= caches[0]["budget_bytes"]

    # Tenant B: 404 by name (as a model and as params.adapter) and by id; not on its /v1/models.
    ob = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=other.headers["Authorization"].split()[1],
                       max_retries=0, timeout=60)  # fmt: skip
    with pytest.raises(openai.NotFoundError):
        ob.completions.create(model=f"{BASE}:{name}", prompt=TAUGHT_PROMPT, max_tokens=4)
    for ref in (name, adapter_id):
        body = {"variant": BASE, "input": {"prompt": TAUGHT_PROMPT}, "params": {"adapter": ref}}
        assert_envelope(other.post("/v1/jobs", json=body), 404, "NOT_FOUND")
    assert_envelope(other.get(f"/v1/adapters/{adapter_id}"), 404, "NOT_FOUND")
    theirs = next(m for m in other.get("/v1/models").json()["data"] if m["id"] == BASE)
    assert adapter_id not in {a["id"] for a in theirs["adapters"]}


def test_an_adapter_a_variant_does_not_take_or_that_is_not_there_is_refused(client: httpx.Client) -> None:
    body = {"variant": "echo", "input": {"prompt": "hi"}, "params": {"adapter": "anything"}}
    assert_envelope(client.post("/v1/jobs", json=body), 422, "VALIDATION_ERROR")
    body = {"variant": f"{BASE}:no-such-adapter", "input": {"prompt": "hi"}}
    assert_envelope(client.post("/v1/jobs", json=body), 404, "NOT_FOUND")
    body = {"variant": f"{BASE}:../../etc", "input": {"prompt": "hi"}}
    assert_envelope(client.post("/v1/jobs", json=body), 422, "VALIDATION_ERROR")
