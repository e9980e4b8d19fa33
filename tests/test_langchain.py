"""LangChain's `ChatOpenAI` (langchain-openai) pointed at gemmaq: a second client, one nobody here
wrote. Invoke and stream on Gemma 3 270M; tool calls through the echo variant, which says back a
call that the worker parses, so the result does not hang on what a 270M model would choose."""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from tests.helpers.stack import Stack

pytestmark = pytest.mark.stack


def chat(stack: Stack, key: str, model: str = "gemma-3-270m", **options: object) -> ChatOpenAI:
    return ChatOpenAI(
        model=model, base_url=f"{stack.url}/v1", api_key=key, temperature=0, max_retries=0,
        timeout=120, **options,
    )  # fmt: skip


def test_invoke_and_stream_give_the_same_reply(stack: Stack, key: str) -> None:
    model = chat(stack, key, max_tokens=24)
    reply = model.invoke("Name three colours of a rainbow.")
    assert isinstance(reply, AIMessage) and isinstance(reply.content, str) and reply.content
    assert reply.response_metadata["finish_reason"] in ("stop", "length")
    assert reply.usage_metadata is not None and 0 < reply.usage_metadata["output_tokens"] <= 24
    chunks = list(
        chat(stack, key, max_tokens=24, stream_usage=True).stream("Name three colours of a rainbow.")
    )
    assert len([c for c in chunks if c.content]) >= 2, "the reply came in one piece, not streamed"
    assert "".join(str(c.content) for c in chunks) == reply.content
    assert any(c.usage_metadata for c in chunks)


@tool
def get_weather(location: str, days: int) -> str:
    """The weather forecast for a city, for a number of days."""
    return f"sunny in {location} for {days} days"


def test_tool_calls_come_back_parsed(stack: Stack, key: str) -> None:
    model = chat(stack, key, model="echo").bind_tools([get_weather])
    reply = model.invoke('FUNCTION_CALL: get_weather(location="Lisbon, Portugal", days=3)')
    assert isinstance(reply, AIMessage)
    assert [(c["name"], c["args"]) for c in reply.tool_calls] == [
        ("get_weather", {"location": "Lisbon, Portugal", "days": 3})
    ]
    assert reply.response_metadata["finish_reason"] == "tool_calls"
    assert get_weather.invoke(reply.tool_calls[0]["args"]) == "sunny in Lisbon, Portugal for 3 days"
