"""The checks a job's submission goes through (api/submission.py runs them): `check_spec`, cheap,
before anything is written; `check_costly`, which costs work (a grammar compiled, a webhook's host
resolved), a user's submissions taking turns for it (`PerUser`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from starlette.concurrency import run_in_threadpool

from api.fleet import FleetView, availability
from api.media_admission import check_parts
from core import structured
from core.errors import PayloadTooLarge, Unavailable, UnknownVariant, ValidationFailed
from core.schemas import JobCreate
from core.settings import Settings
from core.variants import Variant, VariantRegistry
from core.webhooks import check_target

# A token is at least ~1 character; input far past the variant's token cap is refused here,
# the exact token count is checked by the worker's tokenizer.
CHARS_PER_TOKEN_CEILING = 8


async def check_spec(
    spec: JobCreate, variants: VariantRegistry, fleet: FleetView, settings: Settings
) -> Variant:
    variant = variants.get(spec.variant)
    if variant is None:
        raise UnknownVariant(
            f"unknown variant {spec.variant!r}", {"variant": spec.variant, "variants": variants.names()}
        )
    if spec.task not in variant.tasks:
        serving = variants.serving(spec.task)
        raise ValidationFailed(
            f"variant {variant.name!r} does not serve task {spec.task!r}; variants that do: {serving}",
            {"variant": variant.name, "task": spec.task, "variants": serving},
        )
    if "max_new_tokens" not in spec.params.model_fields_set:  # the default fits every variant
        spec.params.max_new_tokens = min(spec.params.max_new_tokens, variant.max_new_tokens)
    if spec.params.timeout_s is not None and spec.params.timeout_s > variant.timeout_s:
        raise ValidationFailed(
            f"params.timeout_s: at most {variant.timeout_s} for {variant.name}",
            {"timeout_s": spec.params.timeout_s, "limit": variant.timeout_s},
        )
    if spec.expires_at is not None:
        check_expiry(spec.expires_at, settings.job_expires_max_s)
    if spec.params.max_new_tokens > variant.max_new_tokens:
        raise ValidationFailed(
            f"params.max_new_tokens: at most {variant.max_new_tokens} for {variant.name}",
            {"max_new_tokens": spec.params.max_new_tokens, "limit": variant.max_new_tokens},
        )
    budget = variant.max_input_tokens * CHARS_PER_TOKEN_CEILING
    if spec.input.chars() > budget:
        raise PayloadTooLarge(
            f"input is {spec.input.chars()} characters; "
            f"{variant.name} takes at most {variant.max_input_tokens} tokens",
            {"characters": spec.input.chars(), "max_input_tokens": variant.max_input_tokens},
        )
    check_parts(spec, variant, settings, variants)
    if variant.engine == "whisper" and spec.params.audio_task == "translate":
        target = (spec.params.target_language or "english").lower()
        if not variant.translate or target not in ("en", "english"):
            raise ValidationFailed(
                f"{variant.name} cannot translate into {spec.params.target_language or 'English'}: "
                + ("Whisper translates into English only" if variant.translate else "it does not translate"),
                {"variant": variant.name, "target_language": spec.params.target_language},
            )
    if spec.params.constrained():
        _check_constrained(spec, variant)
    problem = availability(variant, variants, await fleet.workers())
    if problem is not None:  # refused only on a fresh read of the heartbeats
        problem = availability(variant, variants, await fleet.workers(fresh=True))
    if problem is not None:
        raise Unavailable(f"variant {variant.name!r} cannot run here: {problem}", {"variant": variant.name})
    return variant


def check_expiry(expires_at: datetime, max_ahead_s: int) -> None:
    """A tenant's `expires_at`: with a time zone, ahead of now, and at most `max_ahead_s` ahead
    (a far-future time would be stored but could not be read back)."""
    if expires_at.tzinfo is None:
        raise ValidationFailed("expires_at: give a time zone (e.g. 2026-01-01T00:00:00Z)")
    ahead = (expires_at - datetime.now(UTC)).total_seconds()  # years 1..9999 subtract fine
    if ahead <= 0:
        raise ValidationFailed("expires_at: already past", {"expires_at": expires_at.isoformat()})
    if ahead > max_ahead_s:
        raise ValidationFailed(
            f"expires_at: at most {max_ahead_s} s ahead",
            {"expires_at": expires_at.isoformat(), "limit_s": max_ahead_s},
        )


def _check_constrained(spec: JobCreate, variant: Variant) -> None:
    """A constrained reply: the variant decodes step by step, and a named tool is among the tools
    (its grammar's compile is a costly check: `check_costly`)."""
    params = spec.params
    if variant.batching != "continuous":
        raise ValidationFailed(
            f"{_grammar_field(spec)}: {variant.name} does not constrain its replies (its batching is "
            f"{variant.batching}); text variants with continuous batching do",
            {"variant": variant.name},
        )
    if params.tool_choice not in (None, "none", "auto") and not spec.input.tools:
        raise ValidationFailed("params.tool_choice: a tool is required, but input.tools is empty")


def _grammar_field(spec: JobCreate) -> str:
    choice = spec.params.tool_choice
    return "params.tool_choice" if choice not in (None, "none") else "params.response_format"


async def check_costly(spec: JobCreate, settings: Settings) -> None:
    """The checks that cost work, in threads (never on the event loop): a reply's grammar compiles
    within the limits (remembered per grammar), a webhook's host resolves to a public address."""
    params = spec.params
    if params.constrained():
        try:
            grammar = structured.grammar_of(params.response_format, params.tool_choice, spec.input.tools)
            if grammar is not None:
                await run_in_threadpool(structured.check_cached, grammar)
        except structured.StructuredError as exc:
            field = _grammar_field(spec)
            raise ValidationFailed(f"{field}: {exc}", {"field": field}) from None
    if spec.webhook_url is not None:
        await run_in_threadpool(check_target, spec.webhook_url, settings)  # resolves the host


class PerUser:
    """At most `n` of one user's submissions at a time in their costly checks, in this API process;
    the others wait their turn. A tenant's burst of unique schemas, webhook hosts or images takes
    `n` of the process's threads, never all of them."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._turns: dict[str, tuple[asyncio.Semaphore, int]] = {}  # user → (turns, asking)

    @contextlib.asynccontextmanager
    async def turn(self, user_id: str) -> AsyncIterator[None]:
        turns, asking = self._turns.get(user_id, (None, 0))
        turns = turns or asyncio.Semaphore(self.n)
        self._turns[user_id] = (turns, asking + 1)
        try:
            async with turns:
                yield
        finally:
            turns, asking = self._turns[user_id]
            if asking <= 1:
                del self._turns[user_id]
            else:
                self._turns[user_id] = (turns, asking - 1)
