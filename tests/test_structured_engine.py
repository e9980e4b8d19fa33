"""Constrained decoding in the engine, on the real Gemma 3 270M weights (float32, so batched and alone
agree exactly): rows with different schemas, and rows with none, share one continuous batch, each
held to its own grammar; the free rows produce what they produce alone."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest

from core import structured
from core.schemas import GenerationParams, Tool
from tests.helpers.models import gemma_270m_float32
from workers.engine.continuous import results_of
from workers.engine.text import TextEngine
from workers.shared.base import Request, Result

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
ANSWER = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["yes", "no"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}


def json_schema(schema: dict[str, Any], name: str = "out") -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def engine() -> Iterator[TextEngine]:
    model, tokenizer = gemma_270m_float32()
    engine = TextEngine(
        name="gemma-3-270m",
        model=model,
        tokenizer=tokenizer,
        device="cpu",
        max_batch_size=8,
        max_input_tokens=4096,
    )
    engine.grammars.tokenizer()  # built here, once for the module
    yield engine


def run(
    engine: TextEngine, requests: list[Request], *, join_at: dict[str, int] | None = None
) -> dict[str, Result]:
    """Requests through one running batch; `join_at`: the step a request joins at (else 0)."""
    stream = engine.stream()
    join_at = join_at or {}
    results: dict[str, Result] = {}
    step = 0
    while len(results) < len(requests):
        joining = [r for r in requests if join_at.get(r.job_id, 0) == step]
        done = stream.join([(r.job_id, r, engine.encode(r)) for r in joining])
        if stream.rows:
            done += stream.step(lambda ids: [None] * len(ids))
        results.update({str(key): result for key, result in results_of(done)})
        step += 1
    return results


def ask(i: int, prompt: str, **params: Any) -> Request:
    return Request(job_id=f"r{i}", messages=None, prompt=prompt, params=GenerationParams(**params))


@pytest.mark.stack
def test_rows_with_two_schemas_and_rows_with_none_share_a_batch(engine: TextEngine) -> None:
    free = [
        ask(0, "The capital city of France is", max_new_tokens=12),
        ask(1, "Once upon a time", max_new_tokens=20),
    ]
    person = [
        ask(
            2 + i,
            f"A user record for person number {i}, as JSON:",
            max_new_tokens=96,
            response_format=json_schema(PERSON),
        )
        for i in range(2)
    ]
    answer = [
        ask(4, "Is the sky blue? Answer as JSON:", max_new_tokens=32, response_format=json_schema(ANSWER)),
        ask(5, "Any JSON object:", max_new_tokens=48, response_format={"type": "json_object"}),
    ]
    alone = {
        r.job_id: run(engine, [ask(int(r.job_id[1:]), r.prompt or "", **r.params.model_dump())])[r.job_id]
        for r in free
    }
    together = run(engine, [*free, *person, *answer], join_at={"r1": 3, "r3": 5, "r5": 2})
    for r in free:
        assert together[r.job_id].text == alone[r.job_id].text, r.job_id
        assert together[r.job_id].grammar_compile_ms is None
    expected: list[tuple[Request, dict[str, Any]]] = [
        (person[0], PERSON),
        (person[1], PERSON),
        (answer[0], ANSWER),
        (answer[1], {"type": "object"}),
    ]
    for r, schema in expected:
        result = together[r.job_id]
        assert result.finish_reason == "stop", (r.job_id, result.text)
        jsonschema.validate(json.loads(result.text), schema)
        assert result.grammar_mask_ms is not None and result.grammar_mask_ms < 50
        assert result.grammar_compile_ms is not None


@pytest.mark.stack
def test_a_grammar_compiles_once(engine: TextEngine) -> None:
    first = run(engine, [ask(0, "JSON:", max_new_tokens=40, response_format=json_schema(ANSWER, "once"))])[
        "r0"
    ]
    again = run(engine, [ask(1, "JSON:", max_new_tokens=40, response_format=json_schema(ANSWER, "once"))])[
        "r1"
    ]
    assert again.grammar_compile_ms == 0.0
    assert first.text == again.text


@pytest.mark.stack
def test_a_required_tool_call_matches_the_tools_schema(engine: TextEngine) -> None:
    weather = Tool.model_validate(
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["c", "f"]}},
                    "required": ["city", "unit"],
                    "additionalProperties": False,
                },
            },
        }
    )
    add = Tool.model_validate({"name": "add", "parameters": {"properties": {"a": {"type": "integer"}}}})
    for i, choice in enumerate(["required", {"type": "function", "function": {"name": "get_weather"}}]):
        r = Request(
            job_id=f"t{i}",
            messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            prompt=None,
            params=GenerationParams(max_new_tokens=64, tool_choice=choice),
            tools=[weather, add],
        )
        result = run(engine, [r])[r.job_id]
        assert result.finish_reason == "stop", result.text
        call = json.loads(result.text)
        assert call["name"] in ("get_weather", "add")
        if call["name"] == "get_weather":
            jsonschema.validate(call["arguments"], weather.function.parameters)


@pytest.mark.stack
def test_auto_lets_the_reply_be_text_or_a_valid_call(engine: TextEngine) -> None:
    weather = Tool.model_validate(
        {
            "name": "get_weather",
            "parameters": {"properties": {"city": {"type": "string"}}, "required": ["city"]},
        }
    )
    grammar = structured.grammar_of(None, "auto", [weather])
    assert grammar is not None

    def follows(text: str) -> bool:
        constraint = engine.grammars.constraint(grammar)
        return all(
            constraint.matcher.consume_token(t)
            for t in engine.tokenizer(text, add_special_tokens=False)["input_ids"]
        )

    assert follows("It is sunny today {probably}.")
    assert follows('{"name":"get_weather","arguments":{"city":"Paris"}}')
    assert not follows(
        '{"name":"get_weather","arguments":{"town":"Paris"}}'
    )  # once a call starts, it is valid
    assert not follows('{"name":"set_weather"')
    r = Request(
        job_id="auto",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        prompt=None,
        params=GenerationParams(max_new_tokens=48, tool_choice="auto"),
        tools=[weather],
    )
    text = run(engine, [r])["auto"].text
    if text.startswith("{"):
        call = json.loads(text)
        assert call["name"] == "get_weather" and isinstance(call["arguments"]["city"], str)


@pytest.mark.unit
def test_a_grammar_over_its_compile_budget_is_refused() -> None:
    grammar = structured.grammar_of(structured.ResponseFormat(type="json_object"), None, None)
    assert grammar is not None
    assert structured.check(grammar) < structured.COMPILE_BUDGET_MS
    with pytest.raises(structured.StructuredError, match="to compile"):
        structured.check(grammar, budget_ms=0.0)


@pytest.mark.stack
def test_a_greedy_row_whose_pick_its_grammar_allows_is_not_masked_and_picks_the_same(
    engine: TextEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The best token, when the grammar allows it, is the best allowed one: the row takes it with
    no mask unpacked onto its scores. Masking every step (no pick allowed as it is) gives the same
    replies."""
    from workers.engine.constrain import StepMasks

    applied: list[int] = []
    apply = StepMasks.apply

    def counting(self: StepMasks, k: int, scores: Any) -> None:
        applied.append(k)
        apply(self, k, scores)

    monkeypatch.setattr(StepMasks, "apply", counting)

    def requests() -> list[Request]:
        person, answer = json_schema(PERSON), json_schema(ANSWER)
        return [
            ask(0, "A user record for person number 7, as JSON:", max_new_tokens=96, response_format=person),
            ask(1, "Is the sky blue? Answer as JSON:", max_new_tokens=32, response_format=answer),
        ]

    checked = run(engine, requests())
    masked_when_checked = len(applied)
    applied.clear()
    monkeypatch.setattr(StepMasks, "allows", lambda self, k, token: False)
    every_step = run(engine, requests())
    steps = sum(r.output_tokens for r in every_step.values())
    for job_id, result in every_step.items():
        assert checked[job_id].text == result.text, job_id
        jsonschema.validate(json.loads(result.text), PERSON if job_id == "r0" else ANSWER)
    assert len(applied) == steps  # masking every step: a mask a row a step
    assert masked_when_checked < steps / 2, (masked_when_checked, steps)  # most picks needed none
