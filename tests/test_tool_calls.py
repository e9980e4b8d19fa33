"""The tool-call parser over replies shaped like real model output (no servers needed)."""

from __future__ import annotations

import pytest

from core.schemas import Tool
from core.tool_calls import parse_tool_calls, tool_prompt

pytestmark = pytest.mark.unit

TOOLS = [
    Tool.model_validate(
        {
            "name": "get_weather_forecast",
            "description": "Get weather forecast for a location",
            "parameters": {
                "properties": {
                    "location": {"type": "string", "description": "City and country"},
                    "days": {"type": "integer", "description": "Number of days (1-7)"},
                }
            },
        }
    ),
    Tool.model_validate(
        {
            "type": "function",
            "function": {
                "name": "get_weather_alerts",
                "description": "Get current weather alerts",
                "parameters": {
                    "properties": {"location": {"type": "string"}, "severity": {"type": "string"}}
                },
            },
        }
    ),
]
FORECAST = {"name": "get_weather_forecast", "arguments": {"location": "Tokyo, Japan", "days": 5}}
ALERTS = {"name": "get_weather_alerts", "arguments": {"location": "Tokyo, Japan", "severity": "severe"}}


@pytest.mark.parametrize(
    ("reply", "calls"),
    [
        # The seeds' format, two calls on their own lines.
        (
            'FUNCTION_CALL: get_weather_forecast(location="Tokyo, Japan", days=5)\n'
            'FUNCTION_CALL: get_weather_alerts(location="Tokyo, Japan", severity="severe")',
            [FORECAST, ALERTS],
        ),
        # Gemma's Python-style call in a tool_code fence.
        ('```tool_code\nget_weather_forecast(location="Tokyo, Japan", days=5)\n```', [FORECAST]),
        # Positional arguments follow the schema's property order.
        ('Sure! get_weather_forecast("Tokyo, Japan", 5)', [FORECAST]),
        # JSON with "parameters", inside a json fence, after some prose.
        (
            'I will check.\n```json\n{"name": "get_weather_alerts", "parameters": '
            '{"location": "Tokyo, Japan", "severity": "severe"}}\n```',
            [ALERTS],
        ),
        # OpenAI-style wrapper with arguments as a JSON string.
        (
            '{"tool_calls": [{"function": {"name": "get_weather_forecast", '
            '"arguments": "{\\"location\\": \\"Tokyo, Japan\\", \\"days\\": 5}"}}]}',
            [FORECAST],
        ),
        # A JSON list of calls.
        (
            '[{"name": "get_weather_forecast", "arguments": {"location": "Tokyo, Japan", "days": 5}}, '
            '{"name": "get_weather_alerts", '
            '"arguments": {"location": "Tokyo, Japan", "severity": "severe"}}]',
            [FORECAST, ALERTS],
        ),
        # A quoted parenthesis does not end the call early.
        (
            'FUNCTION_CALL: get_weather_alerts(location="Tokyo (Japan)", severity="severe")',
            [
                {
                    "name": "get_weather_alerts",
                    "arguments": {"location": "Tokyo (Japan)", "severity": "severe"},
                }
            ],
        ),
    ],
)
def test_calls_are_parsed(reply: str, calls: list[dict[str, object]]) -> None:
    found, attempted = parse_tool_calls(reply, TOOLS)
    assert found == calls
    assert attempted


@pytest.mark.parametrize(
    "reply",
    [
        'FUNCTION_CALL: get_weather_forecast(location="Tokyo',  # cut off by max_new_tokens
        "FUNCTION_CALL: get_weather_forecast(location=Tokyo)",  # a bare name, not a literal
        '{"name": "get_weather_forecast", "arguments": {"location": "Tok',  # truncated JSON
        'FUNCTION_CALL: book_flight(to="Tokyo")',  # a tool the job did not declare
        "get_weather_forecast(__import__('os').system('true'))",  # never evaluated
        "FUNCTION_CALL: get_weather_forecast(location={1, 2}, days=float('nan'))",  # not storable as JSON
        '{"name": "get_weather_forecast", "arguments": {"location": "a\\u0000b"}}',  # NUL cannot be stored
    ],
)
def test_broken_calls_are_reported_not_parsed(reply: str) -> None:
    found, attempted = parse_tool_calls(reply, TOOLS)
    assert found == []
    assert attempted


def test_a_reply_that_names_a_tool_without_calling_it_is_unparsed() -> None:
    reply = "You have access to these functions:\n- get_weather_forecast: Get weather forecast"  # the 270M's
    assert parse_tool_calls(reply, TOOLS) == ([], True)


def test_plain_text_is_not_a_call() -> None:
    assert parse_tool_calls("It will be sunny in Tokyo all week.", TOOLS) == ([], False)
    assert parse_tool_calls('{"name": "Ada Lovelace", "born": 1815}', TOOLS) == ([], False)


def test_tools_with_a_malformed_schema_are_refused() -> None:
    with pytest.raises(ValueError, match="properties"):
        Tool.model_validate({"name": "f", "parameters": {"properties": ["location"]}})


def test_prompt_lists_every_tool_and_the_format() -> None:
    prompt = tool_prompt(TOOLS)
    assert "get_weather_forecast" in prompt and "get_weather_alerts" in prompt
    assert "location (string)" in prompt and "days (integer)" in prompt
    assert "FUNCTION_CALL:" in prompt


@pytest.mark.parametrize(
    ("reply", "calls"),
    [
        # Prose before and after a call line.
        (
            'Let me check.\nFUNCTION_CALL: get_weather_forecast(location="Tokyo, Japan", days=5)\n'
            "I will report back.",
            [FORECAST],
        ),
        # Two JSON calls in running text, each in its place.
        (
            'Sure: {"name": "get_weather_forecast", "arguments": {"location": "Tokyo, Japan", "days": 5}}'
            ' and then {"name": "get_weather_alerts", "arguments": '
            '{"location": "Tokyo, Japan", "severity": "severe"}}. Done.',
            [FORECAST, ALERTS],
        ),
        # The same call twice counts once.
        ('FUNCTION_CALL: get_weather_forecast(location="Tokyo, Japan", days=5)\n' * 2, [FORECAST]),
        # A malformed JSON call does not hide a well-formed call after it.
        (
            '{"name": "get_weather_forecast", "arguments": {"location": } }\n'
            'FUNCTION_CALL: get_weather_alerts(location="Tokyo, Japan", severity="severe")',
            [ALERTS],
        ),
        # A list of calls: the undeclared tool is dropped, the declared one kept.
        (
            '[{"name": "book_flight", "arguments": {"to": "Tokyo"}}, '
            '{"name": "get_weather_forecast", "arguments": {"location": "Tokyo, Japan", "days": 5}}]',
            [FORECAST],
        ),
        # `function_call`, arguments as a JSON string.
        (
            '{"function_call": {"name": "get_weather_alerts", "arguments": '
            '"{\\"location\\": \\"Tokyo, Japan\\", \\"severity\\": \\"severe\\"}"}}',
            [ALERTS],
        ),
        # No arguments at all: an empty object.
        ('{"name": "get_weather_alerts"}', [{"name": "get_weather_alerts", "arguments": {}}]),
        # Nested values inside the arguments object are kept as they are.
        (
            '{"name": "get_weather_forecast", "arguments": {"location": {"city": "Tokyo"}, "days": [1, 2]}}',
            [{"name": "get_weather_forecast", "arguments": {"location": {"city": "Tokyo"}, "days": [1, 2]}}],
        ),
    ],
)
def test_calls_among_text_and_other_calls(reply: str, calls: list[dict[str, object]]) -> None:
    assert parse_tool_calls(reply, TOOLS) == (calls, True)


@pytest.mark.parametrize(
    "arguments",
    ["[1, 2]", '"[1, 2]"', '"{not json"', "null", "5", '"plain text"'],
)
def test_arguments_that_are_not_an_object_are_no_call(arguments: str) -> None:
    reply = '{"name": "get_weather_forecast", "arguments": ' + arguments + "}"
    assert parse_tool_calls(reply, TOOLS) == ([], True)


def test_calls_to_tools_the_job_did_not_declare() -> None:
    assert parse_tool_calls('{"name": "book_flight", "arguments": {"to": "Tokyo"}}', TOOLS) == ([], False)
    assert parse_tool_calls("FUNCTION_CALL: book_flight(to='Tokyo')", TOOLS) == ([], True)  # the marker
    forecast = '{"name": "get_weather_forecast", "arguments": {"days": 1}}'
    assert parse_tool_calls(forecast, []) == ([], False)  # no tools: nothing is a call


def test_more_positional_arguments_than_parameters_are_no_call() -> None:
    assert parse_tool_calls('get_weather_forecast("Tokyo", 5, 6)', TOOLS) == ([], True)
