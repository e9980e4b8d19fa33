"""Function calling: the prompt that offers tools, and the parser that reads calls back out of a reply.

Models write calls in several shapes; the parser accepts the ones seen in practice:
a plain `FUNCTION_CALL: name(a="x", n=3)` line, Gemma's Python-style calls (bare or in a
```tool_code fence), and JSON (`{"name": ..., "arguments"|"parameters": {...}}`, a list of
those, `{"tool_calls": [...]}`, `{"function_call": {...}}`), fenced or not. Only tools the
job declared count.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator, Sequence
from typing import Any

from core.schemas import Tool

MAX_JSON_STARTS = 200


def tool_prompt(tools: Sequence[Tool], *, json_calls: bool = False) -> str:
    """A system prompt describing the tools, for chat templates that take no `tools` argument.
    `json_calls`: calls are asked for as the JSON objects a constrained reply is held to."""
    lines = []
    for tool in tools:
        fn = tool.function
        lines.append(f"- {fn.name}: {fn.description}".rstrip(": "))
        props = fn.parameters.get("properties", {}) if isinstance(fn.parameters, dict) else {}
        if props:
            described = ", ".join(
                f"{k} ({v.get('type', 'string')})" for k, v in props.items() if isinstance(v, dict)
            )
            lines.append(f"  Parameters: {described}")
    if json_calls:
        return (
            "You have access to these functions:\n"
            + "\n".join(lines)
            + "\n\nWhen the request needs a function, reply only with a JSON object, in this format:\n"
            '{"name": "function_name", "arguments": {"param1": "value1"}}\n'
            "If no function is needed, reply normally."
        )
    return (
        "You have access to these functions:\n"
        + "\n".join(lines)
        + "\n\nWhen the request needs a function, reply only with one line per call, in this format:\n"
        'FUNCTION_CALL: function_name(param1="value1", param2="value2")\n'
        f"For example:\n{_example(tools[0])}\n"
        "If no function is needed, reply normally."
    )


def _example(tool: Tool) -> str:
    samples = {"string": '"..."', "integer": "1", "number": "1.0", "boolean": "True"}
    props = tool.function.parameters.get("properties", {})
    args = ", ".join(f"{k}={samples.get(v.get('type', 'string'), chr(34) * 2)}" for k, v in props.items())
    return f"FUNCTION_CALL: {tool.function.name}({args})"


def _json_values(text: str) -> Iterator[Any]:
    decoder = json.JSONDecoder()
    starts = [m.start() for m in re.finditer(r"[\[{]", text)][:MAX_JSON_STARTS]
    end_of_last = -1
    for start in starts:
        if start < end_of_last:
            continue
        try:
            value, end = decoder.raw_decode(text, start)
        except ValueError:
            continue
        end_of_last = end
        yield value


def _from_json(value: Any, names: set[str]) -> list[dict[str, Any]]:
    if isinstance(value, list):
        return [call for item in value for call in _from_json(item, names)]
    if not isinstance(value, dict):
        return []
    for wrapper in ("tool_calls", "function_calls"):
        if isinstance(value.get(wrapper), list):
            return _from_json(value[wrapper], names)
    for wrapper in ("function_call", "function", "tool_call"):
        if isinstance(value.get(wrapper), dict):
            return _from_json(value[wrapper], names)
    name = value.get("name")
    if not isinstance(name, str) or name not in names:
        return []
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return []
    return [{"name": name, "arguments": arguments}] if isinstance(arguments, dict) else []


def _balanced_call(text: str, open_at: int) -> str | None:
    """The text from `(` at open_at to its matching `)`, quotes respected."""
    depth, quote, escaped = 0, "", False
    for i in range(open_at, len(text)):
        ch = text[i]
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
            if depth == 0:
                return text[open_at : i + 1]
    return None


def _from_python(text: str, tools: dict[str, Tool]) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    if not tools:
        return calls
    pattern = re.compile(r"(?<![\w.])(" + "|".join(re.escape(n) for n in tools) + r")\s*\(")
    for match in pattern.finditer(text):
        args = _balanced_call(text, match.end() - 1)
        if args is None:
            continue
        try:
            node = ast.parse("f" + args, mode="eval").body
            assert isinstance(node, ast.Call)
            arguments = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg}
            positional = [ast.literal_eval(a) for a in node.args]
        except (SyntaxError, ValueError, AssertionError, TypeError, MemoryError, RecursionError):
            continue
        if positional:
            order = list(tools[match.group(1)].function.parameters.get("properties", {}))
            if len(positional) > len(order):
                continue
            arguments = dict(zip(order, positional, strict=False)) | arguments
        calls.append({"name": match.group(1), "arguments": arguments})
    return calls


def _looks_like_a_call(text: str, names: set[str]) -> bool:
    """The reply reaches for a tool: the call marker, a tool_code fence, or a declared tool's name."""
    if "FUNCTION_CALL" in text or "tool_code" in text:
        return True
    return any(re.search(r"(?<![\w.])" + re.escape(n) + r"(?![\w])", text) for n in names)


def parse_tool_calls(text: str, tools: Sequence[Tool]) -> tuple[list[dict[str, Any]], bool]:
    """(calls, attempted): the calls found, and whether the text tried to call a tool at all."""
    by_name = {t.function.name: t for t in tools}
    names = set(by_name)
    calls: list[dict[str, Any]] = []
    for value in _json_values(text):
        calls += _from_json(value, names)
    if not calls:
        calls = _from_python(text, by_name)
    unique: list[dict[str, Any]] = []
    for call in calls:
        if _storable(call) and call not in unique:
            unique.append(call)
    return unique, bool(unique) or _looks_like_a_call(text, names) or bool(calls)


def _storable(call: dict[str, Any]) -> bool:
    """Plain JSON that PostgreSQL's jsonb takes: no sets, bytes, NaN or NUL characters."""
    try:
        dumped = json.dumps(call, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return "\\u0000" not in dumped
