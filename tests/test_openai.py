"""The official `openai` package against gemmaq's OpenAI-compatible routes, on Gemma 3 270M."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.helpers.stack import Stack

pytestmark = pytest.mark.stack

MODEL = "gemma-3-270m"
QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Name three colours of a rainbow."}]


@pytest.fixture
def oai(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0, timeout=180)


def test_chat_completion(oai: openai.OpenAI, client: httpx.Client) -> None:
    reply = oai.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0)
    assert reply.object == "chat.completion" and reply.model == MODEL
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 12
    # It was a job like any other: readable, with its metrics, and the same text as a job gives.
    job = client.get(f"/v1/jobs/{reply.id.removeprefix('chatcmpl-')}").json()
    assert job["status"] == "succeeded" and job["metadata"] == {"api": "chat.completions"}
    assert job["result"]["text"] == choice.message.content and job["metrics"]["batch_size"] >= 1
    body = {"variant": MODEL, "input": {"messages": QUESTION}, "params": {"max_new_tokens": 12}}
    same = client.get(f"/v1/jobs/{client.post('/v1/jobs', json=body).json()['id']}", params={"wait": 60})
    assert same.json()["result"]["text"] == choice.message.content


def test_chat_completion_streamed(oai: openai.OpenAI, client: httpx.Client) -> None:
    stream = oai.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=48, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2, "the text came in one piece, not streamed"
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(reasons) == 1 and reasons[0] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    job = client.get(f"/v1/jobs/{chunks[0].id.removeprefix('chatcmpl-')}").json()
    assert "".join(pieces) == job["result"]["text"]
    assert chunks[-1].usage.completion_tokens == job["result"]["usage"]["output_tokens"]


def test_chat_completion_refusals(stack: Stack, oai: openai.OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as unknown:
        oai.chat.completions.create(model="no-such-model", messages=QUESTION)
    assert unknown.value.body["code"] == "UNKNOWN_VARIANT"  # type: ignore[index]
    remote_image: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://10.0.0.1/x.png"}}]}
    ]
    with pytest.raises(openai.UnprocessableEntityError):
        oai.chat.completions.create(model="tiny-gemma-3-vision", messages=remote_image)
    with pytest.raises(openai.UnprocessableEntityError):
        oai.chat.completions.create(model=MODEL, messages=QUESTION, n=2)
    with pytest.raises(openai.UnprocessableEntityError):
        oai.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10**6)
    stranger = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="gq_not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.chat.completions.create(model=MODEL, messages=QUESTION)
