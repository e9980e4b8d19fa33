"""Structured outputs: the grammar that constrains a job's reply, built and checked without a model.

A job's `params.response_format` (`json_object`, or `json_schema` with a schema) and its
`params.tool_choice` (`auto`, `required`, or one named function, with `input.tools`) become one
llguidance grammar (`grammar_of`). The API checks it at submission (`check`): a keyword the
grammar compiler does not implement, a schema too large or too deep, or one that takes too long
to compile is a 422 there, never a failed job. The engine compiles the same grammar against its
variant's tokenizer, once per grammar (cached by hash), and masks each constrained row's logits
at every step (workers.engine.constrain).

llguidance, chosen over xgrammar and outlines-core (README "Structured outputs" has the
figures): it needs no torch (the API checks schemas without loading one), it refuses keywords it
does not implement instead of ignoring them, its work per grammar and per step is bounded by
fuel limits (`LIMITS`), and it computes a 262k-token mask in well under a millisecond.

JSON is compact (no whitespace between tokens): a small model cannot pad a reply with endless
blank lines, and the reply costs fewer tokens.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_RESPONSE_SCHEMA_BYTES = 65_536  # a response_format's schema, as JSON
MAX_RESPONSE_SCHEMA_DEPTH = 32  # nesting of objects and arrays in it (about 15 levels of objects)
COMPILE_BUDGET_MS = 250.0  # a grammar the compiler takes longer over is refused at submission

# What llguidance may spend on one grammar: about 2 ms of lexer fuel at its start, 5 ms a step.
LIMIT_FIELDS: dict[str, int] = {
    "initial_lexer_fuel": 100_000,
    "step_lexer_fuel": 70_000,
    "step_max_items": 50_000,
    "max_items_in_row": 2_000,
    "max_lexer_states": 50_000,
    "max_grammar_size": 200_000,
}
# Forced over whatever a schema's own "x-guidance" says.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "lenient": False}


class StructuredError(ValueError):
    """The grammar cannot be served; the message names why (an unsupported keyword, a limit)."""


def depth(value: Any) -> int:
    """How deeply objects and arrays nest in `value` (0 for a scalar), without recursing."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children)
    return deepest


class JsonSchemaFormat(BaseModel):
    """OpenAI's `json_schema` object: `{"name", "schema", "strict", "description"}`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)
    name: str = Field("response", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = Field(None, max_length=2000)
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _bounded(self) -> JsonSchemaFormat:
        if depth(self.schema_) > MAX_RESPONSE_SCHEMA_DEPTH:
            raise ValueError(f"json_schema.schema nests deeper than {MAX_RESPONSE_SCHEMA_DEPTH} levels")
        dumped = json.dumps(self.schema_, allow_nan=False)
        if len(dumped.encode()) > MAX_RESPONSE_SCHEMA_BYTES:
            raise ValueError(f"json_schema.schema is more than {MAX_RESPONSE_SCHEMA_BYTES} bytes of JSON")
        if "\\u0000" in dumped:
            raise ValueError("json_schema.schema must not contain NUL (\\u0000) characters")
        return self


class ResponseFormat(BaseModel):
    """`{"type": "text"}`, `{"type": "json_object"}` or `{"type": "json_schema", "json_schema": {...}}`."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_iff_json_schema(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("response_format: `json_schema` is given with type json_schema, and only then")
        return self

    def target(self) -> dict[str, Any] | None:
        """The JSON schema the reply must match, or None for plain text."""
        if self.type == "json_object":
            return {"type": "object"}
        if self.json_schema is not None:
            return self.json_schema.schema_
        return None


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=64)


class NamedToolChoice(BaseModel):
    """`{"type": "function", "function": {"name": ...}}`: the reply calls this tool."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function"] = "function"
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


def _arguments_schema(parameters: dict[str, Any]) -> dict[str, Any]:
    """A call's arguments: an object, and (as OpenAI's strict mode has it) only the declared
    arguments where the tool's schema lists them and says nothing of others."""
    schema = parameters if parameters.get("type") else {"type": "object", **parameters}
    if "properties" in schema and "additionalProperties" not in schema:
        schema = {**schema, "additionalProperties": False}
    return schema


def _call_schema(tool: Any) -> dict[str, Any]:
    fn = tool.function
    return {
        "type": "object",
        "properties": {"name": {"const": fn.name}, "arguments": _arguments_schema(fn.parameters)},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _json_grammar(schema: dict[str, Any]) -> str:
    from llguidance import LLMatcher

    return str(LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS))  # type: ignore[arg-type]


def grammar_of(
    response_format: ResponseFormat | None, tool_choice: ToolChoice | None, tools: list[Any] | None
) -> str | None:
    """The llguidance grammar a job's reply is held to, or None when it is free text (see
    `_grammar_of`); StructuredError for anything the grammar compiler raises on a tenant's schema."""
    try:
        return _grammar_of(response_format, tool_choice, tools)
    except StructuredError:
        raise
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException as exc:  # a Rust panic surfaces as a BaseException
        raise StructuredError(
            f"the schema could not be read ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None


def _grammar_of(
    response_format: ResponseFormat | None, tool_choice: ToolChoice | None, tools: list[Any] | None
) -> str | None:
    """The llguidance grammar a job's reply is held to, or None when it is free text.

    A tool call is the JSON object `{"name": <a declared tool>, "arguments": {...}}` (what
    core.tool_calls parses): `required` or a named function makes the whole reply one call;
    `auto` lets the reply be text, or a call once its first character opens one."""
    if tools and tool_choice is not None and tool_choice != "none":
        chosen = list(tools)
        if isinstance(tool_choice, NamedToolChoice):
            chosen = [t for t in tools if t.function.name == tool_choice.function.name]
            if not chosen:
                raise StructuredError(f"no tool named {tool_choice.function.name!r} among the tools given")
        calls = [_call_schema(t) for t in chosen]
        call = calls[0] if len(calls) == 1 else {"anyOf": calls}
        if tool_choice != "auto":
            return _json_grammar(call)
        from llguidance import LLMatcher

        lark = (
            "start: call | TEXT\n"
            f"call: %json {json.dumps({**call, 'x-guidance': JSON_OPTIONS})}\n"
            "TEXT: /[^{](.|\\n)*/\n"
        )
        return str(LLMatcher.grammar_from_lark(lark))
    schema = response_format.target() if response_format is not None else None
    return None if schema is None else _json_grammar(schema)


def limits() -> Any:
    from llguidance import LLParserLimits

    return LLParserLimits(**LIMIT_FIELDS, verbose_errors=False)  # type: ignore[arg-type]


def check(grammar: str, budget_ms: float = COMPILE_BUDGET_MS) -> float:
    """Compile `grammar` without a tokenizer within the limits; returns the milliseconds it took.
    Raises StructuredError naming what the compiler refused, or that it took too long."""
    from llguidance import LLMatcher

    started = time.perf_counter()
    try:
        error = LLMatcher.validate_grammar(grammar, None, limits=limits())
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException as exc:  # a Rust panic surfaces as a BaseException
        error = f"{type(exc).__name__}: {str(exc)[:200]}"
    elapsed = (time.perf_counter() - started) * 1000
    if error:
        raise StructuredError(_plain(error))
    if elapsed > budget_ms:
        raise StructuredError(
            f"the schema took {elapsed:.0f} ms to compile; at most {budget_ms:.0f} ms is served"
        )
    return elapsed


_checked: dict[str, str | None] = {}  # grammar key → the refusal, or None for a grammar served
CHECKED_GRAMMARS = 1024
_checked_lock = threading.Lock()


def check_cached(grammar: str) -> None:
    """`check`, remembered per grammar: a schema sent again costs a dictionary lookup. Called
    from the API's thread pool, so the memory is guarded."""
    k = key(grammar)
    with _checked_lock:
        known = k in _checked
        refusal = _checked.get(k)
    if not known:
        try:
            check(grammar)
            refusal = None
        except StructuredError as exc:
            refusal = str(exc)
        with _checked_lock:
            _checked[k] = refusal
            while len(_checked) > CHECKED_GRAMMARS:
                _checked.pop(next(iter(_checked)))
    if refusal is not None:
        raise StructuredError(refusal)


def _plain(error: str) -> str:
    """The compiler's message on one line, without its "error:" prefixes."""
    lines = [ln.strip().removeprefix("Error: ").removeprefix("error: ") for ln in error.strip().splitlines()]
    return " ".join(ln for ln in lines if ln)[:500] or "the grammar was refused"


def key(grammar: str) -> str:
    """The cache key of a compiled grammar."""
    return hashlib.sha256(grammar.encode()).hexdigest()


def schema_bytes(response_format: ResponseFormat | None) -> int:
    """What a response format adds to a job's input size (counted in max_input_bytes)."""
    if response_format is None or response_format.json_schema is None:
        return 0
    return len(json.dumps(response_format.json_schema.schema_).encode())
