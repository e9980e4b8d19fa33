"""The Responses API through the official `openai` package: background responses polled and
cancelled, stored in PostgreSQL (read back by an API process that was not running when they
were made), owner-only, continued with `previous_response_id`, streamed, listed and deleted."""

from __future__ import annotations

import subprocess
import time
from typing import Any

import openai
import pytest

from gemmaq.embedded import free_port
from tests.helpers.stack import Stack, wait_healthy

pytestmark = pytest.mark.stack

MODEL = "gemma-3-270m"
BERLIN = "The capital city of Germany is Berlin. The capital city of France is"


def oai_for(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def until(oai: openai.OpenAI, response_id: str, statuses: set[str], timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while (response := oai.responses.retrieve(response_id)).status not in statuses:
        assert time.monotonic() < deadline, response.status
        time.sleep(0.2)
    return response


def test_a_background_response_is_queued_at_once_and_completes(stack: Stack, key: str) -> None:
    oai = oai_for(stack.url, key)
    started = time.monotonic()
    created = oai.responses.create(model=MODEL, input=BERLIN, max_output_tokens=16, background=True)
    assert time.monotonic() - started < 5 and created.status == "queued" and created.background
    assert created.id.startswith("resp_") and created.output == []
    done = until(oai, created.id, {"completed", "incomplete", "failed", "cancelled"})
    assert done.status in ("completed", "incomplete") and done.output_text
    assert done.usage is not None and 0 < done.usage.output_tokens <= 16
    # Cut by max_output_tokens: incomplete (the echo variant says back 2 of the 5 words).
    cut = until(oai, oai.responses.create(model="echo", input="one two three four five", max_output_tokens=2,
                                          background=True).id, {"completed", "incomplete"})  # fmt: skip
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.output_text == "one two"
    items = oai.responses.input_items.list(created.id)
    assert [(i.role, i.content[0].text) for i in items.data] == [("user", BERLIN)]  # type: ignore[index,union-attr]


def test_a_response_outlives_the_api_process_that_made_it(stack: Stack, key: str) -> None:
    """Made through an API process of its own, which is then stopped; one started afterwards,
    on the same port, reads it back the same: nothing of it lived in process memory."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def api() -> subprocess.Popen[bytes]:
        proc = stack.gemmaq("api", "--port", str(port), log="api-restarted.log")
        wait_healthy(url, proc)
        return proc

    first = api()
    try:
        made = oai_for(url, key).responses.create(model="echo", input="kept in PostgreSQL", background=True)
        done = until(oai_for(url, key), made.id, {"completed"})
    finally:
        first.terminate()
        first.wait(timeout=30)
    second = api()
    try:
        again = oai_for(url, key).responses.retrieve(made.id)
        assert again.status == "completed" and again.output_text == done.output_text == "kept in PostgreSQL"
    finally:
        second.terminate()
        second.wait(timeout=30)


def test_a_running_response_is_cancelled(stack: Stack, key: str) -> None:
    oai = oai_for(stack.url, key)
    long = oai.responses.create(
        model=MODEL,
        input="Here is a long essay about lighthouses:\n\n",
        max_output_tokens=400,
        background=True,
    )
    until(oai, long.id, {"in_progress"})
    cancelled = oai.responses.cancel(long.id)
    assert cancelled.status == "cancelled"
    assert oai.responses.retrieve(long.id).status == "cancelled"


def test_responses_are_their_owners_only(stack: Stack, key: str) -> None:
    oai = oai_for(stack.url, key)
    mine = oai.responses.create(model="echo", input="mine", store=True)
    assert mine.status == "completed" and mine.output_text == "mine"
    stranger = oai_for(stack.url, stack.new_key("stranger"))
    for call in (
        lambda: stranger.responses.retrieve(mine.id),
        lambda: stranger.responses.cancel(mine.id),
        lambda: stranger.responses.delete(mine.id),
        lambda: stranger.responses.input_items.list(mine.id),
        lambda: stranger.responses.create(model="echo", input="x", previous_response_id=mine.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    oai.responses.delete(mine.id)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(mine.id)


def test_previous_response_id_carries_the_conversation(stack: Stack, key: str) -> None:
    oai = oai_for(stack.url, key)
    first = oai.responses.create(model="echo", input="My name is Ada.", instructions="Be brief.")
    second = oai.responses.create(
        model="echo",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "What is my name?"}]}],
        previous_response_id=first.id,
        instructions="Answer in one word.",
    )
    assert second.previous_response_id == first.id and second.status == "completed"
    [(messages,)] = stack.sql(
        "SELECT input->'messages' FROM jobs WHERE metadata->>'response_id' = %s", second.id
    )
    assert messages == [
        {"role": "system", "content": "Answer in one word."},  # instructions do not carry over
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "My name is Ada."},  # the echo variant's reply
        {"role": "user", "content": [{"type": "text", "text": "What is my name?"}]},
    ]
    with pytest.raises(openai.NotFoundError):
        oai.responses.create(model="echo", input="x", previous_response_id="resp_nope")


def test_a_streamed_response_sends_the_responses_events(stack: Stack, key: str) -> None:
    oai = oai_for(stack.url, key)
    events = list(oai.responses.create(model=MODEL, input=BERLIN, max_output_tokens=24, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) >= 2
    final = events[-1].response  # type: ignore[union-attr]
    assert "".join(deltas) == final.output_text
    assert oai.responses.retrieve(final.id).output_text == final.output_text
