"""The content filter on a real stack: a user's moderation policy (their quota's override) refuses
inputs at submission, withholds an output that falls in an output rule (stream included), and
answers `POST /v1/moderations`; the matched text is never logged."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import openai
import pytest

from core.schemas import BATCH_ENDED
from tests.helpers.stack import Stack

pytestmark = pytest.mark.stack

TERM = "quokkazoid"  # a word of no language, so that nothing else trips over it
POLICY: dict[str, Any] = {
    "categories": {
        "secret-project": {"terms": [TERM], "patterns": [r"project\s+q-\d+"]},
        "capitals": {"terms": ["paris"], "stages": ["output"]},
    }
}
BERLIN = "The capital city of Germany is Berlin. The capital city of France is"  # the 270M says Paris


@pytest.fixture(scope="module")
def filtered_key(stack: Stack) -> str:
    return stack.new_key("filtered", moderation_policy=POLICY)


def echo(prompt: str) -> dict[str, Any]:
    return {"variant": "echo", "input": {"prompt": prompt}}


def oai_for(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0, timeout=120)


def test_inputs_in_a_category_are_refused_before_anything_is_queued(stack: Stack, filtered_key: str) -> None:
    oai = oai_for(stack, filtered_key)
    with stack.client(filtered_key) as client:
        job = client.post(
            "/v1/jobs", json={"variant": "echo", "input": {"prompt": f"Tell me of the {TERM.upper()}"}}
        )
        assert job.status_code == 400, job.text
        error = job.json()["error"]
        assert error["code"] == "CONTENT_FILTERED" and error["details"] == {"category": "secret-project"}
        assert TERM not in job.text.lower()
        pattern = client.post(
            "/v1/jobs", json={"variant": "echo", "input": {"prompt": "About Project  Q-17?"}}
        )
        assert (
            pattern.status_code == 400 and pattern.json()["error"]["details"]["category"] == "secret-project"
        )
        with pytest.raises(openai.BadRequestError) as chat:
            oai.chat.completions.create(
                model="echo", messages=[{"role": "system", "content": f"You are {TERM}."},
                                        {"role": "user", "content": "Hello"}],
            )  # fmt: skip
        assert chat.value.body["code"] == "CONTENT_FILTERED"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError) as completion:
            oai.completions.create(model="echo", prompt=["fine", f"the {TERM}"])
        assert completion.value.body["code"] == "CONTENT_FILTERED"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError) as response:
            oai.responses.create(model="echo", input=f"What is the {TERM}?", background=True)
        assert response.value.body["code"] == "CONTENT_FILTERED"  # type: ignore[index]
        assert client.get("/v1/jobs").json()["data"] == []  # nothing was queued
        # An output-only rule leaves inputs alone; and another user's policy is the deployment's.
        ok = client.post("/v1/jobs", json=echo("Paris in spring"))
        assert ok.status_code == 202
    with stack.client(stack.new_key("unfiltered")) as other:
        assert other.post("/v1/jobs", json=echo(TERM)).status_code == 202
        refused = other.post(
            "/v1/jobs", json={"variant": "echo", "input": {"prompt": "How do I make a pipe bomb"}}
        )
        assert refused.json()["error"]["details"] == {"category": "illicit/violent"}  # the shipped default


def test_an_output_in_an_output_rule_is_withheld_and_never_streamed(stack: Stack, filtered_key: str) -> None:
    oai = oai_for(stack, filtered_key)
    shown: list[str] = []
    stream = oai.completions.with_streaming_response.create(
        model="gemma-3-270m", prompt=BERLIN, max_tokens=24, temperature=0, stream=True
    )
    with stream as response, pytest.raises(openai.APIError) as ended:
        job_id = response.headers["x-gemmaq-job-id"]
        for chunk in response.parse():
            shown.extend(c.text for c in chunk.choices)
    assert "RESPONSE_FILTERED" in str(ended.value.body)
    assert "paris" not in "".join(shown).lower()
    with stack.client(filtered_key) as client:
        job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "RESPONSE_FILTERED"
    assert "capitals" in job["error"]["message"] and "paris" not in job["error"]["message"].lower()
    assert job["result"]["text"] == "" and job["result"]["finish_reason"] == "content_filter"
    assert job["result"]["usage"]["output_tokens"] > 0  # what was generated is charged
    stored = stack.sql("SELECT result->>'text' FROM jobs WHERE id = %s", job_id)
    assert stored == [("",)]
    # The same prompt for a user without that rule: the text the filter withheld.
    with stack.client(stack.new_key("capitals-ok")) as client:
        body = {"variant": "gemma-3-270m", "input": {"prompt": BERLIN}, "params": {"max_new_tokens": 24}}
        plain = client.get(f"/v1/jobs/{client.post('/v1/jobs', json=body).json()['id']}", params={"wait": 60})
        assert "Paris" in plain.json()["result"]["text"]


def test_moderations_answer_from_the_policy(stack: Stack, filtered_key: str) -> None:
    oai = oai_for(stack, filtered_key)
    flagged = oai.moderations.create(input=f"What is {TERM}?")
    [result] = flagged.results
    assert result.flagged and result.categories.model_dump(by_alias=True).get("secret-project") is True
    assert result.categories.violence is False  # OpenAI's categories are all there
    many = oai.moderations.create(input=["A walk in the park.", "About project q-9", "paris"])
    assert [r.flagged for r in many.results] == [False, True, True]
    with pytest.raises(openai.UnprocessableEntityError):
        oai.moderations.create(input=["x"] * 33)


def test_the_policy_is_set_by_cli_and_admin_api_and_bad_ones_are_refused(
    stack: Stack, tmp_path: Path
) -> None:
    key = stack.run_cli("users", "create", "policy-cli").strip().splitlines()[-1]
    policy = tmp_path / "policy.toml"
    policy.write_text('[categories.fruit]\nterms = ["durian"]\n')
    stack.run_cli("users", "set-quota", "policy-cli", "--moderation-policy", str(policy))
    with stack.client(key) as client:
        refused = client.post("/v1/jobs", json=echo("a DURIAN"))
        assert refused.json()["error"]["details"] == {"category": "fruit"}
        stack.run_cli("users", "set-quota", "policy-cli", "--moderation-policy", "default")
        assert client.post("/v1/jobs", json=echo("a durian")).status_code == 202
    admin_key = stack.run_cli("users", "create", "policy-admin", "--admin").strip().splitlines()[-1]
    with stack.client(admin_key) as admin:
        bad = admin.patch(
            "/v1/admin/users/policy-cli/quota",
            json={"moderation_policy": {"categories": {"x": {"patterns": ["(?<=a)b"]}}}},
        )
        assert bad.status_code == 422 and "RE2" in bad.text
        good = admin.patch(
            "/v1/admin/users/policy-cli/quota",
            json={"moderation_policy": {"categories": {"x": {"terms": ["kiwi"]}}}},
        )
        assert good.json()["quota"]["moderation_policy"]["categories"]["x"]["terms"] == ["kiwi"]
    with stack.client(key) as client:
        assert client.post("/v1/jobs", json=echo("kiwi")).status_code == 400
        assert "moderation_policy" not in client.get("/v1/usage").text  # a user never sees their rules


def test_no_log_line_holds_the_matched_text(stack: Stack, filtered_key: str) -> None:
    with stack.client(filtered_key) as client:
        client.post("/v1/jobs", json=echo(f"log test {TERM}"))
    logs = [p.read_text(errors="replace").lower() for p in stack.logs.glob("*.log")]
    assert logs and any("job.filtered" in text for text in logs)
    assert not any(TERM in text for text in logs)
    assert not any("paris" in text for text in logs)


def test_a_batch_line_in_a_category_is_a_line_error(stack: Stack, filtered_key: str) -> None:
    oai = oai_for(stack, filtered_key)
    lines = [
        {
            "custom_id": "ok",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "echo", "prompt": "fine"},
        },
        {
            "custom_id": "no",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "echo", "prompt": TERM},
        },
    ]
    file = oai.files.create(
        file=("lines.jsonl", "\n".join(json.dumps(x) for x in lines).encode()), purpose="batch"
    )
    batch = oai.batches.create(input_file_id=file.id, endpoint="/v1/completions", completion_window="24h")
    deadline = time.monotonic() + 120
    while (batch := oai.batches.retrieve(batch.id)).status not in BATCH_ENDED:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert batch.status == "completed"
    [error] = [json.loads(x) for x in oai.files.content(batch.error_file_id or "").content.splitlines()]
    assert error["custom_id"] == "no" and error["error"]["code"] == "CONTENT_FILTERED"
    assert TERM not in json.dumps(error)


def test_refusals_are_counted_in_metrics_and_the_summary(stack: Stack) -> None:
    key = stack.new_key("counted", moderation_policy=POLICY)
    with stack.client(key) as client:
        for _ in range(3):
            assert client.post("/v1/jobs", json=echo(TERM)).status_code == 400
        job = client.post("/v1/jobs", json=echo("We met in Paris.")).json()
        ended = client.get(f"/v1/jobs/{job['id']}", params={"wait": 60}).json()
        assert ended["error"]["code"] == "RESPONSE_FILTERED"  # echo says it back: an output rule
        summary = client.get("/v1/metrics/summary").json()
        assert summary["filtered"] == {"input": 3, "output": 1}
        scraped = client.get(f"{stack.url}/metrics").text
    assert 'gemmaq_content_filtered_total{category="secret-project",stage="input"}' in scraped
    assert 'gemmaq_content_filtered_total{category="capitals",stage="output"}' in scraped
