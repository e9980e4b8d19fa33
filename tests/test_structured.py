"""Structured outputs through the whole stack, on Gemma 3 270M: JSON that validates and tool calls
that parse, by construction, from jobs, chat completions, Responses, LangChain and batch lines;
schemas the grammar compiler cannot serve are refused at submission."""

from __future__ import annotations

import functools
import json
import operator
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from openai.types.chat import ChatCompletionMessageFunctionToolCall
from pydantic import BaseModel, Field

from tests.helpers.batches import counts, oai_for, records, run_batch, wait_batch
from tests.helpers.stack import Stack, wait_job

pytestmark = pytest.mark.stack

TICKET = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "priority": {"enum": ["low", "medium", "high"]},
        "estimate_hours": {"type": "integer", "minimum": 1, "maximum": 40},
        "labels": {
            "type": "array",
            "items": {"enum": ["bug", "feature", "docs"]},
            "minItems": 1,
            "maxItems": 3,
        },
        "owner": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 24},
                "team": {"enum": ["api", "workers", "infra"]},
            },
            "required": ["name", "team"],
            "additionalProperties": False,
        },
        "steps": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "order": {"type": "integer", "minimum": 1, "maximum": 9},
                    "done": {"type": "boolean"},
                },
                "required": ["order", "done"],
                "additionalProperties": False,
            },
            "maxItems": 2,
        },
    },
    "required": ["title", "priority", "estimate_hours", "labels", "owner", "steps"],
    "additionalProperties": False,
}
TOPICS = [
    "a login page that fails",
    "slow search results",
    "a missing README section",
    "dark mode",
    "a crash on upload",
    "retry webhooks",
    "export to CSV",
    "flaky tests",
    "rate limit errors",
    "typos",
]


def schema_format(schema: dict[str, Any], name: str = "ticket") -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def test_fifty_jobs_with_a_nested_schema_all_validate(stack: Stack) -> None:
    key = stack.new_key(max_concurrent_jobs=64, requests_per_minute=1000)
    with stack.client(key) as client:
        ids = []
        for i in range(50):
            body = {
                "input": {"prompt": f"Ticket {i} about {TOPICS[i % len(TOPICS)]}, as JSON:"},
                "params": {"max_new_tokens": 160, "response_format": schema_format(TICKET)},
            }
            answer = client.post("/v1/jobs", json=body)
            assert answer.status_code == 202, answer.text
            ids.append(answer.json()["id"])
        jobs = [wait_job(client, job_id, timeout=600) for job_id in ids]
    for job in jobs:
        assert job["status"] == "succeeded", job
        assert job["result"]["finish_reason"] == "stop", job["result"]
        jsonschema.validate(json.loads(job["result"]["text"]), TICKET)
        metrics = job["metrics"]
        assert metrics["grammar_compile_ms"] is not None and metrics["grammar_mask_ms"] is not None
    assert sum(1 for j in jobs if j["metrics"]["grammar_compile_ms"] == 0.0) >= 49, (
        "compiled once, then cached"
    )
    assert len({j["result"]["text"] for j in jobs}) > 1


WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}


def test_the_openai_package_gets_json_and_tool_calls(stack: Stack, key: str) -> None:
    oai = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0, timeout=180)
    reply = oai.chat.completions.create(
        model="gemma-3-270m",
        messages=[{"role": "user", "content": "Describe the weather in Paris as JSON."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "weather", "schema": WEATHER, "strict": True},
        },
        max_tokens=64,
    )
    content = reply.choices[0].message.content
    assert content is not None and reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(content), WEATHER)

    any_object = oai.chat.completions.create(
        model="gemma-3-270m",
        messages=[{"role": "user", "content": "A JSON object about cats."}],
        response_format={"type": "json_object"},
        max_tokens=64,
    )
    if any_object.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(any_object.choices[0].message.content or ""), dict)

    tools: Any = [
        {
            "type": "function",
            "function": {"name": "get_weather", "description": "Today's weather", "parameters": WEATHER},
        }
    ]
    called = oai.chat.completions.create(
        model="gemma-3-270m",
        messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
        tools=tools,
        tool_choice="required",
        max_tokens=64,
    )
    choice = called.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls or []
    assert isinstance(call, ChatCompletionMessageFunctionToolCall) and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)

    named = oai.chat.completions.create(
        model="gemma-3-270m",
        messages=[{"role": "user", "content": "Weather please."}],
        max_tokens=64,
        tools=[*tools, {"type": "function", "function": {"name": "noop", "parameters": {"type": "object"}}}],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    names = [c.function.name for c in named.choices[0].message.tool_calls or [] if c.type == "function"]
    assert names == ["get_weather"]

    response = oai.responses.create(
        model="gemma-3-270m",
        input="The weather in Rome, as JSON.",
        max_output_tokens=64,
        text={"format": {"type": "json_schema", "name": "weather", "schema": WEATHER, "strict": True}},
    )
    assert response.status == "completed", response
    jsonschema.validate(json.loads(response.output_text), WEATHER)


class Person(BaseModel):
    name: str = Field(max_length=30)
    age: int = Field(ge=0, le=120)
    city: Literal["Paris", "Berlin", "Madrid"]


@tool
def get_weather(city: str, days: int) -> str:
    """The weather forecast for a city, for a number of days."""
    return f"sunny in {city} for {days} days"


def test_langchain_gets_parsed_objects(stack: Stack, key: str) -> None:
    model = ChatOpenAI(
        model="gemma-3-270m",
        base_url=f"{stack.url}/v1",
        api_key=key,
        temperature=0,
        max_retries=0,
        timeout=180,
        max_tokens=64,
    )
    person = model.with_structured_output(Person).invoke("A person who lives in Berlin:")
    assert isinstance(person, Person)
    reply = model.bind_tools([get_weather], tool_choice="required").invoke("Weather in Madrid for 2 days?")
    assert isinstance(reply, AIMessage)
    [call] = reply.tool_calls
    assert call["name"] == "get_weather" and set(call["args"]) == {"city", "days"}
    assert isinstance(call["args"]["days"], int)
    assert reply.response_metadata["finish_reason"] == "tool_calls"
    streamed = list(
        model.bind_tools([get_weather], tool_choice="required").stream("Weather in Madrid for 2 days?")
    )
    chunks = [c for c in streamed if isinstance(c, AIMessageChunk)]
    merged = functools.reduce(operator.add, chunks[1:], chunks[0])
    assert isinstance(merged, AIMessageChunk)
    assert not merged.content, "a required call streams as a call, not as text"
    assert [c["name"] for c in merged.tool_calls] == ["get_weather"]


def test_a_batch_of_lines_with_schemas(stack: Stack, key: str) -> None:
    oai = oai_for(stack, key)
    answer = {
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    lines = [
        {
            "custom_id": f"s-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "gemma-3-270m",
                "max_tokens": 48,
                "messages": [{"role": "user", "content": f"Question {i}: is water wet?"}],
                "response_format": schema_format(answer if i % 2 else WEATHER, f"s{i % 2}"),
            },
        }
        for i in range(6)
    ]
    done = wait_batch(oai, run_batch(oai, lines).id, timeout=300)
    assert done.status == "completed" and counts(done) == (6, 6, 0)
    for record in records(oai, done.output_file_id):
        i = int(record["custom_id"].removeprefix("s-"))
        body = record["response"]["body"]
        assert body["choices"][0]["finish_reason"] == "stop"
        jsonschema.validate(
            json.loads(body["choices"][0]["message"]["content"]), answer if i % 2 else WEATHER
        )


def deep(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


BAD = {
    "unsupported keyword": (
        {"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}},
        "dependentSchemas",
    ),
    "too deep": (deep(20), "deeper"),
    "1 MiB": ({"type": "object", "description": "x" * (1 << 20)}, "bytes"),
    "bad regex": ({"type": "string", "pattern": "(a|b"}, "regex"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_schemas_are_422_at_submission(stack: Stack, key: str, client: httpx.Client, case: str) -> None:
    schema, named = BAD[case]
    before = stack.sql("SELECT count(*) FROM jobs")
    job = client.post(
        "/v1/jobs", json={"input": {"prompt": "x"}, "params": {"response_format": schema_format(schema)}}
    )
    assert job.status_code == 422, job.text
    assert job.json()["error"]["code"] == "VALIDATION_ERROR" and named in job.json()["error"]["message"]
    chat = client.post(
        "/v1/chat/completions",
        json={
            "model": "gemma-3-270m",
            "messages": [{"role": "user", "content": "x"}],
            "response_format": schema_format(schema),
        },
    )
    assert chat.status_code == 422 and named in chat.json()["error"]["message"], chat.text
    assert stack.sql("SELECT count(*) FROM jobs") == before, "nothing was queued"


def test_other_refusals(client: httpx.Client) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    cases = [
        # a named tool that is not among the tools
        {
            "input": {"prompt": "x", "tools": tools},
            "params": {"tool_choice": {"type": "function", "function": {"name": "g"}}},
        },
        # a tool required, and none given
        {"input": {"prompt": "x"}, "params": {"tool_choice": "required"}},
        # a variant whose batching is static (no step-by-step decoding to constrain)
        {"variant": "echo", "input": {"prompt": "x"}, "params": {"response_format": {"type": "json_object"}}},
    ]
    for body in cases:
        answer = client.post("/v1/jobs", json=body)
        assert answer.status_code == 422, (body, answer.text)
