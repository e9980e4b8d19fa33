"""`POST /v1/completions` through the official `openai` package, on Gemma 3 270M (a base model:
the prompt is continued as it stands)."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.helpers.stack import Stack

pytestmark = pytest.mark.stack

MODEL = "gemma-3-270m"
PROMPT = "The capital city of Germany is Berlin. The capital city of France is"  # as in the README


@pytest.fixture
def oai(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0, timeout=180)


def prompt_of(stack: Stack, job_id: str) -> object:
    return stack.sql("SELECT input->>'prompt' FROM jobs WHERE id = %s", job_id)[0][0]


def test_completion_continues_the_prompt(stack: Stack, oai: openai.OpenAI, client: httpx.Client) -> None:
    reply = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert reply.object == "text_completion" and reply.model == MODEL
    [choice] = reply.choices
    assert "Paris" in choice.text and choice.index == 0
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # An ordinary job: its prompt as given (no chat template), the same text a job gets.
    job = client.get(f"/v1/jobs/{reply.id.removeprefix('cmpl-')}").json()
    assert job["status"] == "succeeded" and job["metadata"] == {"api": "completions"}
    assert prompt_of(stack, job["id"]) == PROMPT
    assert job["result"]["text"] == choice.text
    body = {"variant": MODEL, "input": {"prompt": PROMPT}, "params": {"max_new_tokens": 8}}
    same = client.get(f"/v1/jobs/{client.post('/v1/jobs', json=body).json()['id']}", params={"wait": 60})
    assert same.json()["result"]["text"] == choice.text
    # max_tokens left out: OpenAI's default of 16.
    default = oai.completions.create(model=MODEL, prompt="Once upon a time")
    assert default.usage is not None and default.usage.completion_tokens <= 16


def test_completion_streamed_joins_into_the_same_text(oai: openai.OpenAI) -> None:
    whole = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0)
    chunks = list(
        oai.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert all(c.object == "text_completion" for c in chunks) and len({c.id for c in chunks}) == 1
    pieces = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert len(pieces) >= 2, "the text came in one piece, not streamed"
    assert "".join(pieces) == whole.choices[0].text
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_a_list_of_prompts_fans_out_to_one_job_each(
    stack: Stack, oai: openai.OpenAI, client: httpx.Client
) -> None:
    prompts = [PROMPT, "1, 2, 3, 4,", "Once upon a time"]
    reply = oai.completions.with_raw_response.create(model=MODEL, prompt=prompts, max_tokens=6)
    job_ids = reply.headers["x-gemmaq-job-id"].split(",")
    completion = reply.parse()
    assert [c.index for c in completion.choices] == [0, 1, 2] and len(job_ids) == 3
    for prompt, job_id, choice in zip(prompts, job_ids, completion.choices, strict=True):
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert prompt_of(stack, job_id) == prompt and job["result"]["text"] == choice.text
    assert "Paris" in completion.choices[0].text
    assert completion.usage is not None
    assert completion.usage.completion_tokens == sum(
        client.get(f"/v1/jobs/{j}").json()["result"]["usage"]["output_tokens"] for j in job_ids
    )
    # Streamed, each choice's chunks carry its index and join into its job's text. (Not
    # necessarily the text above: greedy bf16 decoding may pick another token when the rows
    # are batched otherwise.)
    texts: dict[int, str] = {}
    ended: list[int] = []
    streamed = oai.completions.with_raw_response.create(
        model=MODEL, prompt=prompts, max_tokens=6, stream=True
    )
    streamed_ids = streamed.headers["x-gemmaq-job-id"].split(",")
    for chunk in streamed.parse():
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                ended.append(c.index)
    assert sorted(ended) == [0, 1, 2]
    results = [client.get(f"/v1/jobs/{j}").json()["result"]["text"] for j in streamed_ids]
    assert [texts[i] for i in range(3)] == results


@pytest.mark.parametrize(
    "refused",
    [{"echo": True}, {"logprobs": 2}, {"best_of": 3}, {"n": 2}, {"suffix": "end"}, {"presence_penalty": 1}],
)
def test_unsupported_fields_are_422(
    oai: openai.OpenAI, client: httpx.Client, refused: dict[str, object]
) -> None:
    before = client.get("/v1/jobs", params={"limit": 1}).json()
    with pytest.raises(openai.UnprocessableEntityError) as refusal:
        oai.completions.create(model=MODEL, prompt=PROMPT, **refused)  # type: ignore[call-overload]
    assert next(iter(refused)) in refusal.value.body["message"]  # type: ignore[index]
    assert client.get("/v1/jobs", params={"limit": 1}).json() == before  # nothing was queued


def test_a_refused_prompt_queues_none_of_its_mates(
    stack: Stack, oai: openai.OpenAI, client: httpx.Client
) -> None:
    before = client.get("/v1/jobs", params={"limit": 1}).json()
    with pytest.raises(openai.UnprocessableEntityError):  # the second prompt is empty
        oai.completions.create(model=MODEL, prompt=["fine", ""], max_tokens=4)
    with pytest.raises(openai.UnprocessableEntityError):
        oai.completions.create(model=MODEL, prompt=[[1, 2, 3]])  # token ids
    assert client.get("/v1/jobs", params={"limit": 1}).json() == before
    # The third of three prompts is past the user's concurrency cap: the first two are withdrawn.
    capped = stack.new_key("completions-capped", max_concurrent_jobs=2, requests_per_minute=1000)
    small = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=capped, max_retries=0, timeout=60)
    with pytest.raises(openai.RateLimitError):
        small.completions.create(model="echo-slow", prompt=["a", "b", "c"], max_tokens=4)
    with stack.client(capped) as own:
        jobs = own.get("/v1/jobs").json()["data"]
        assert len(jobs) == 2 and {j["status"] for j in jobs} == {"cancelled"}
        after = small.completions.create(model="echo", prompt=["a", "b"], max_tokens=4)
        assert len(after.choices) == 2  # the withdrawn jobs gave their places back
