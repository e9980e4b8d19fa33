"""Text a tenant sends, checked before anything is stored or queued.

JSON can carry strings that are not text: a lone UTF-16 surrogate (`"\\ud800"`), which Python
accepts but no UTF-8 encoder (PostgreSQL's, Redis's, a log line's) can write, and NUL
(`"\\u0000"`), which PostgreSQL's text and jsonb refuse. Both arrive only as JSON escapes, so a
body without such an escape is let through unparsed; one with it is parsed and walked.
"""

from __future__ import annotations

import re
from typing import Any

# \uD800-\uDFFF (either half of a pair; a whole pair is checked after parsing) and \u0000.
_ESCAPES = re.compile(rb"\\u(?:[dD][89a-fA-F][0-9a-fA-F]{2}|0000)")


def suspect(raw: bytes) -> bool:
    """Whether a JSON text might hold a string that is not text (False: it certainly does not)."""
    return _ESCAPES.search(raw) is not None


def string_problem(value: str) -> str | None:
    """Why a string cannot be stored as text, or None."""
    if "\x00" in value:
        return "NUL (\\u0000) is not allowed in text"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "a lone UTF-16 surrogate (\\ud800-\\udfff without its pair) is not text"
    return None


def text_problem(value: Any, at: str = "body") -> str | None:
    """The first string in a parsed JSON value (keys included) that is not text, as
    "where: why", or None. Walks without recursion, so that nesting costs no stack."""
    pending: list[tuple[str, Any]] = [(at, value)]
    while pending:
        where, item = pending.pop()
        if isinstance(item, str):
            problem = string_problem(item)
            if problem:
                return f"{where}: {problem}"
        elif isinstance(item, dict):
            for key, child in item.items():
                problem = string_problem(key) if isinstance(key, str) else None
                if problem:
                    return f"{where}: a key: {problem}"
                pending.append((f"{where}.{key}", child))
        elif isinstance(item, list):
            pending.extend((f"{where}[{i}]", child) for i, child in enumerate(item))
    return None
