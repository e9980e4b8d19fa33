"""`POST /v1/moderations`: OpenAI's moderation shape, answered from the caller's content policy
(core/moderation.py: the deployment's, or their quota's override) — the policy their jobs'
inputs and outputs are checked against. No job is queued: a policy check takes microseconds."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter

from api.deps import SettingsDep, UserDep
from api.errors import responses
from api.schemas import MAX_MODERATION_INPUTS, ModerationRequest
from core.errors import ValidationFailed
from core.moderation import OPENAI_CATEGORIES, policy_for, user_override
from core.schemas import MAX_TEXT_CHARS

router = APIRouter(tags=["openai"])

POLICY_MODEL = "gemmaq-policy"


@router.post(
    "/moderations",
    responses=responses(401, 413, 422),
    summary="Moderation (OpenAI-compatible), from the content policy your jobs are checked against",
)
async def moderations(body: ModerationRequest, user: UserDep, settings: SettingsDep) -> dict[str, Any]:
    texts = body.texts()
    if len(texts) > MAX_MODERATION_INPUTS or any(len(t) > MAX_TEXT_CHARS for t in texts):
        raise ValidationFailed(f"input: at most {MAX_MODERATION_INPUTS} texts of {MAX_TEXT_CHARS} characters")
    policy = policy_for(user_override(user), settings)
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
