"""`POST /v1/moderations`: OpenAI's moderation shape (core/openai_moderations.py), answered from
the caller's content policy (core/moderation.py: the deployment's, or their quota's override) —
the policy their jobs' inputs and outputs are checked against. No job is queued: a policy check
takes microseconds."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import SettingsDep, UserDep
from api.errors import responses
from core.moderation import policy_for, user_override
from core.openai_moderations import ModerationRequest, moderation_of

router = APIRouter(tags=["openai"])


@router.post(
    "/moderations",
    responses=responses(401, 413, 422),
    summary="Moderation (OpenAI-compatible), from the content policy your jobs are checked against",
)
async def moderations(body: ModerationRequest, user: UserDep, settings: SettingsDep) -> dict[str, Any]:
    return moderation_of(body, policy_for(user_override(user), settings))
