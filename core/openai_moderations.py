"""OpenAI's moderation request and result, answered from a content policy (core/moderation.py)."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import Field

from core.errors import ValidationFailed
from core.moderation import OPENAI_CATEGORIES, Policy
from core.openai_chat import Strict
from core.schemas import MAX_TEXT_CHARS, SafeStr

MAX_MODERATION_INPUTS = 32
POLICY_MODEL = "gemmaq-policy"


class TextInput(Strict):
    type: Literal["text"]
    text: SafeStr = Field(max_length=MAX_TEXT_CHARS)


class ModerationRequest(Strict):
    input: SafeStr | list[SafeStr] | list[TextInput] = Field(
        description=f"a text, up to {MAX_MODERATION_INPUTS} texts (a result each), or text parts (one result)"
    )
    model: SafeStr | None = Field(None, max_length=100, description="ignored: the policy answers")

    def texts(self) -> list[str]:
        if isinstance(self.input, str):
            return [self.input]
        if all(isinstance(item, TextInput) for item in self.input):
            return ["\n".join(item.text for item in self.input if isinstance(item, TextInput))]
        return [item for item in self.input if isinstance(item, str)]


def moderation_of(request: ModerationRequest, policy: Policy) -> dict[str, Any]:
    """The moderation object: a result for each text, its categories as `policy` flags them."""
    texts = request.texts()
    if len(texts) > MAX_MODERATION_INPUTS or any(len(t) > MAX_TEXT_CHARS for t in texts):
        raise ValidationFailed(f"input: at most {MAX_MODERATION_INPUTS} texts of {MAX_TEXT_CHARS} characters")
    results = []
    for text in texts:
        flags = dict.fromkeys(OPENAI_CATEGORIES, False) | policy.flags(text)
        results.append(
            {
                "flagged": any(flags.values()),
                "categories": flags,
                "category_scores": {name: 1.0 if hit else 0.0 for name, hit in flags.items()},
                "category_applied_input_types": {name: ["text"] for name in flags},
            }
        )
    return {"id": f"modr-{uuid.uuid4().hex}", "model": request.model or POLICY_MODEL, "results": results}
