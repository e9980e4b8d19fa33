"""What a job spec is checked against before anything is admitted or queued (api/job_checks.py
`check_spec`, then `check_costly`): its variant, task, limits, media kinds, speech options,
grammar, webhook and whether some worker can run it. In this process: variants parsed here, a
real `FleetView` over heartbeats written to the session's Redis."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.asyncio import Redis as AsyncRedis

from api.fleet import FleetView
from api.job_checks import check_costly, check_spec
from core.errors import AppError, PayloadTooLarge, Unavailable, UnknownVariant, ValidationFailed
from core.keys import worker_key
from core.schemas import JobCreate
from core.settings import Settings
from core.variants import Variant, VariantRegistry, parse_variants

pytestmark = pytest.mark.unit

MEDIA = base64.b64encode(b"bytes these checks never decode").decode()  # the media checks do, later


def registry(absent: Path) -> VariantRegistry:
    """`served` and the speech variants have a worker (see `Checks`); `vision` and `lost` have
    none, and no weights on this host (`absent` holds no config.json)."""
    hf = {"family": "t", "size": "0", "source": "hf", "path": str(absent)}
    speech = {**hf, "tasks": ["audio"], "engine": "whisper"}
    variants: dict[str, dict[str, Any]] = {
        "echo": {**hf, "tasks": ["text"], "source": "echo", "engine": "echo", "path": None,
                 "max_new_tokens": 64, "max_input_tokens": 100, "timeout_s": 30},
        "served": {**hf, "tasks": ["text"], "batching": "continuous"},
        "vision": {**hf, "tasks": ["text", "image"], "engine": "processor"},
        "lost": {**hf, "tasks": ["text"]},
        "whisper-en": {**speech, "english_only": True},
        "whisper": {**speech, "translate": True},
    }  # fmt: skip
    return parse_variants({"variants": variants})


class Checks:
    def __init__(self, settings: Settings, variants: VariantRegistry, client: redis.Redis) -> None:
        self.settings = settings
        self.variants = variants
        self.redis = client

    def beat(self, worker: str, **states: dict[str, Any]) -> None:
        """A worker's heartbeat, as workers publish it: variant → its state there."""
        body = {"worker": worker, "device": "cpu", "variants": states}
        self.redis.set(worker_key(self.settings, worker), json.dumps(body), ex=60)

    def check(self, body: dict[str, Any], *, beat_after_first_read: str | None = None) -> JobCreate:
        """`check_spec`, then `check_costly`, on the job `body`; the spec as it leaves them.
        `beat_after_first_read`: a worker for that variant starts just after the view read the
        heartbeats."""
        spec = JobCreate.model_validate(body)

        async def main() -> Variant:
            client = AsyncRedis.from_url(self.settings.broker_url)
            try:
                fleet = FleetView(client, self.settings, fresh_s=60)
                if beat_after_first_read is not None:
                    await fleet.workers()
                    self.beat("late@unit", **{beat_after_first_read: {"state": "cold"}})
                variant = await check_spec(spec, self.variants, fleet, self.settings)
                await check_costly(spec, self.settings)
                return variant
            finally:
                await client.aclose()

        variant = asyncio.run(main())
        assert variant.name == spec.variant
        return spec

    def refused(self, body: dict[str, Any], kind: type[AppError]) -> AppError:
        with pytest.raises(kind) as refusal:
            self.check(body)
        return refusal.value


@pytest.fixture
def checks(embedded_redis: str, tmp_path: Path) -> Iterator[Checks]:
    settings = Settings(redis_url=embedded_redis, namespace=f"unit-{uuid.uuid4().hex[:10]}")
    client = redis.Redis.from_url(embedded_redis)
    c = Checks(settings, registry(tmp_path / "absent"), client)
    c.beat("w1@unit", served={"state": "warm"}, lost={"state": "unavailable", "reason": "out of memory"})
    c.beat("w2@unit", **{"whisper-en": {"state": "warm"}, "whisper": {"state": "loading"}})
    yield c
    client.close()


def text(variant: str = "echo", **params: Any) -> dict[str, Any]:
    return {"variant": variant, "input": {"prompt": "hello"}, "params": params}


def audio(variant: str, **params: Any) -> dict[str, Any]:
    part = {"type": "audio", "data": MEDIA}
    return {"variant": variant, "task": "audio", "input": {"messages": [{"role": "user", "content": [part]}]},
            "params": params}  # fmt: skip


def test_a_good_spec_passes_and_gets_the_variants_default_cap(checks: Checks) -> None:
    assert checks.check(text()).params.max_new_tokens == 64  # the default of 128, down to echo's cap
    assert checks.check(text(max_new_tokens=10)).params.max_new_tokens == 10
    assert checks.check(text("served")).params.max_new_tokens == 128


def test_an_unknown_variant_names_the_known_ones(checks: Checks) -> None:
    error = checks.refused(text("gemma-9-nope"), UnknownVariant)
    assert error.details["variant"] == "gemma-9-nope" and "echo" in error.details["variants"]


def test_a_task_the_variant_does_not_serve_names_those_that_do(checks: Checks) -> None:
    error = checks.refused({**text(), "task": "image"}, ValidationFailed)
    assert "does not serve task 'image'" in error.message and error.details["variants"] == ["vision"]


@pytest.mark.parametrize(
    ("params", "limit"),
    [
        ({"max_new_tokens": 65}, {"max_new_tokens": 65, "limit": 64}),
        ({"timeout_s": 31}, {"timeout_s": 31, "limit": 30}),
    ],
)
def test_limits_of_the_variant(checks: Checks, params: dict[str, Any], limit: dict[str, Any]) -> None:
    assert checks.refused(text(**params), ValidationFailed).details == limit


def test_input_far_over_the_variants_token_cap_is_too_large(checks: Checks) -> None:
    error = checks.refused({"variant": "echo", "input": {"prompt": "x" * 801}}, PayloadTooLarge)
    assert error.details == {"characters": 801, "max_input_tokens": 100}
    checks.check({"variant": "echo", "input": {"prompt": "x" * 800}})  # 8 characters a token, at most


def test_expiry_needs_a_time_zone_and_a_time_to_come(checks: Checks) -> None:
    hour = timedelta(hours=1)
    naive = checks.refused({**text(), "expires_at": (datetime.now() + hour).isoformat()}, ValidationFailed)
    assert "time zone" in naive.message
    past = checks.refused({**text(), "expires_at": (datetime.now(UTC) - hour).isoformat()}, ValidationFailed)
    assert "already past" in past.message
    checks.check({**text(), "expires_at": (datetime.now(UTC) + hour).isoformat()})


def test_media_parts_must_suit_the_variant(checks: Checks) -> None:
    picture = {
        "role": "user",
        "content": [{"type": "image", "data": MEDIA}, {"type": "text", "text": "What?"}],
    }
    error = checks.refused(
        {"variant": "echo", "task": "text", "input": {"messages": [picture]}}, ValidationFailed
    )
    assert "does not take image input" in error.message and error.details["variants"] == ["vision"]


def test_speech_translation_is_into_english_by_variants_that_translate(checks: Checks) -> None:
    english_only = checks.refused(audio("whisper-en", audio_task="translate"), ValidationFailed)
    assert "does not translate" in english_only.message
    french = checks.refused(audio("whisper", audio_task="translate", target_language="fr"), ValidationFailed)
    assert "English only" in french.message and french.details["target_language"] == "fr"
    checks.check(audio("whisper", audio_task="translate", target_language="English"))
    checks.check(audio("whisper-en"))


def test_constrained_replies_need_continuous_batching_and_a_grammar_that_compiles(checks: Checks) -> None:
    json_object = {"type": "json_object"}
    assert "does not constrain" in checks.refused(text(response_format=json_object), ValidationFailed).message
    checks.check(text("served", response_format=json_object))
    required = checks.refused(text("served", tool_choice="required"), ValidationFailed)
    assert "input.tools is empty" in required.message
    regex = {
        "type": "json_schema",
        "json_schema": {"name": "s", "schema": {"type": "string", "pattern": "(a|b"}},
    }
    bad = checks.refused(text("served", response_format=regex), ValidationFailed)
    assert bad.details == {"field": "params.response_format"}


def test_a_webhook_to_a_private_address_is_refused(checks: Checks) -> None:
    error = checks.refused({**text(), "webhook_url": "http://10.0.0.1/hook"}, ValidationFailed)
    assert "private" in error.message


def test_a_variant_no_worker_can_run_is_unavailable(checks: Checks) -> None:
    nowhere = checks.refused(text("vision"), Unavailable)  # no worker, no weights here
    assert "no config.json" in nowhere.message and nowhere.details == {"variant": "vision"}
    assert "out of memory" in checks.refused(text("lost"), Unavailable).message  # its worker says why
    checks.check(text("served"))  # warm on a worker, whatever this host holds


def test_a_worker_that_just_started_is_seen_before_a_refusal(checks: Checks) -> None:
    """The view's heartbeats are a moment old; a refusal is decided on a fresh read."""
    checks.check(text("vision"), beat_after_first_read="vision")


def test_a_tenants_costly_checks_take_turns_while_another_tenants_go_on() -> None:
    """`PerUser`: a tenant with many submissions in their costly checks at once has at most
    `checks_per_user` of them running; another tenant's check starts at once meanwhile."""
    from api.job_checks import PerUser

    async def scenario() -> int:
        turns = PerUser(2)
        running = peak = 0
        release = asyncio.Event()

        async def check(user: str) -> None:
            nonlocal running, peak
            async with turns.turn(user):
                running += 1
                peak = max(peak, running)
                if user == "flood":
                    await release.wait()
                running -= 1

        flood = [asyncio.create_task(check("flood")) for _ in range(20)]
        await asyncio.sleep(0.05)
        flooding_peak = peak
        await asyncio.wait_for(check("other"), timeout=1)  # not behind the flood's 18 waiting
        release.set()
        await asyncio.gather(*flood)
        assert not turns._turns, "a tenant's turns are forgotten once none is asked for"
        return flooding_peak

    assert asyncio.run(scenario()) == 2
