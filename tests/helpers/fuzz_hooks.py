"""Schemathesis hooks (loaded through SCHEMATHESIS_HOOKS) that make every free string hostile.

Before the schema loads, each string that has no format, enum, const or pattern of its own is
given a format of ours, whose strategy mixes ordinary text with what is not quite text: lone
UTF-16 surrogates, NULs, digits that are not ASCII (`isdigit` accepts "²", `int` does not),
direction overrides, and runs long enough to cross any field's limit. JSON bodies get all of it;
query parameters and form fields cannot carry a lone surrogate through UTF-8, so they get the rest.
Strings that name a variant (`variant`, `model`) or a batch's input file are also, half the time,
one the fuzzing namespace serves or holds (GEMMAQ_FUZZ_VARIANTS, GEMMAQ_FUZZ_FILES), so that jobs
and batches are really made and run."""

from __future__ import annotations

import os
from typing import Any

import schemathesis
from hypothesis import strategies as st

HOSTILE_JSON = "gemmaq-hostile"  # in JSON bodies: lone surrogates included
HOSTILE_TEXT = "gemmaq-hostile-text"  # in query strings and forms


def _listed(name: str) -> list[str]:
    return [v for v in os.environ.get(name, "").split(",") if v]


# Fields whose strings are sometimes real names: field → (the names, format in JSON, in forms).
NAMED = {
    field: (names, f"gemmaq-{field}", f"gemmaq-{field}-text")
    for field, names in (
        ("variant", _listed("GEMMAQ_FUZZ_VARIANTS")),
        ("model", _listed("GEMMAQ_FUZZ_VARIANTS")),
        ("input_file_id", _listed("GEMMAQ_FUZZ_FILES")),
    )
}

_ODD = ["\x00", "²", "٣", "\uff15", "⁹", "\u202e", "\ufeff", "é", "\U0001f600", " "]
_SURROGATES = ["\ud800", "\udfff", "\udbff\udbff"]
_RUN_LENGTHS = [1_001, 70_000]


def hostile(surrogates: bool) -> st.SearchStrategy[str]:
    odd = _ODD + (_SURROGATES if surrogates else [])
    piece = st.one_of(st.text(max_size=6), st.sampled_from(odd))
    mixed = st.lists(piece, min_size=1, max_size=5).map("".join)
    runs = st.builds(lambda unit, n: unit * n, st.sampled_from(["a", *odd]), st.sampled_from(_RUN_LENGTHS))
    digits = st.builds(
        lambda a, b: f"{a}{b}", st.sampled_from(["", "1", "²"]), st.sampled_from(["²", "٣h", "\uff15"])
    )
    return st.one_of(mixed, mixed, runs, digits)


def named(names: list[str], surrogates: bool) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(names), hostile(surrogates)) if names else hostile(surrogates)


schemathesis.openapi.format(HOSTILE_JSON, hostile(surrogates=True))
schemathesis.openapi.format(HOSTILE_TEXT, hostile(surrogates=False))
for _names, _json, _text in NAMED.values():
    schemathesis.openapi.format(_json, named(_names, surrogates=True))
    schemathesis.openapi.format(_text, named(_names, surrogates=False))


def _tag(node: Any, json_body: bool, field: str | None = None) -> None:
    """Give every free string below `node` one of the hostile formats."""
    if isinstance(node, list):
        for item in node:
            _tag(item, json_body, field)
        return
    if not isinstance(node, dict):
        return
    if node.get("type") == "string" and not {"format", "enum", "const", "pattern"} & node.keys():
        _, in_json, in_text = NAMED.get(field or "", ((), HOSTILE_JSON, HOSTILE_TEXT))
        node["format"] = in_json if json_body else in_text
    for key, value in node.items():
        if key == "properties" and isinstance(value, dict):
            for name, sub in value.items():
                _tag(sub, json_body, name)
        elif key not in ("enum", "const", "default", "examples", "example"):
            _tag(value, json_body, field if key in ("anyOf", "oneOf", "allOf") else None)


@schemathesis.hook
def before_load_schema(context: schemathesis.HookContext, raw_schema: dict[str, Any]) -> None:
    for name, component in raw_schema.get("components", {}).get("schemas", {}).items():
        # FastAPI names the schemas of form bodies Body_…; the rest are JSON.
        _tag(component, json_body=not name.startswith("Body_"))
    for methods in raw_schema.get("paths", {}).values():
        for operation in methods.values():
            for parameter in operation.get("parameters", []) if isinstance(operation, dict) else []:
                if parameter.get("in") == "query":
                    _tag(parameter.get("schema"), json_body=False, field=parameter.get("name"))
