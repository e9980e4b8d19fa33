"""`POST /v1/moderations`: OpenAI's moderation shape, answered from the caller's content policy
(core/moderation.py: the deployment's, or their quota's override) — the policy their jobs'
inputs and outputs are checked against. No job is queued: a policy check takes microseconds."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import Field

from api.errors import responses
from api.submission import SubmitterDep
from core.errors import ValidationFailed
from core.moderation import OPENAI_CATEGORIES
from core.openai_chat import Strict
from core.schemas import MAX_TEXT_CHARS, SafeStr

router = APIRouter(tags=["openai"])

MAX_INPUTS = 32
POLICY_MODEL = "gemmaq-policy"


class TextInput(Strict):
    type: Literal["text"]
    text: SafeStr = Field(max_length=MAX_TEXT_CHARS)


class ModerationRequest(Strict):
    input: SafeStr | list[SafeStr] | list[TextInput] = Field(
        description=f"a text, up to {MAX_INPUTS} texts (a result each), or text parts (one result)"
    )
    model: SafeStr | None = Field(None, max_length=100, description="ignored: the policy answers")

    def texts(self) -> list[str]:
        if isinstance(self.input, str):
            return [self.input]
        if all(isinstance(item, TextInput) for item in self.input):
            return ["\n".join(item.text for item in self.input if isinstance(item, TextInput))]
        return [item for item in self.input if isinstance(item, str)]


@router.post(
    "/moderations",
    responses=responses(401, 413, 422),
    summary="Moderation (OpenAI-compatible), from the content policy your jobs are checked against",
)
async def moderations(body: ModerationRequest, submitter: SubmitterDep) -> dict[str, Any]:
    texts = body.texts()
    if len(texts) > MAX_INPUTS or any(len(t) > MAX_TEXT_CHARS for t in texts):
        raise ValidationFailed(f"input: at most {MAX_INPUTS} texts of {MAX_TEXT_CHARS} characters")
    policy = submitter.policy()
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
    return {"id": f"modr-{uuid.uuid4().hex}", "model": body.model or POLICY_MODEL, "results": results}
