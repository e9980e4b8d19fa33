"""OpenAI Batch API helpers: request lines, JSONL files, a batch run and waited for, its records."""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from typing import Any

import openai
from openai.types import Batch

from core.schemas import BATCH_ENDED
from tests.helpers.stack import Stack

ENDPOINT = "/v1/chat/completions"


def line(i: int, model: str = "echo", **body: Any) -> dict[str, Any]:
    """A chat completion request line, `req-{i}`; `body` overrides its request's fields."""
    request = {
        "model": model,
        "messages": [{"role": "user", "content": f"Request number {i}."}],
        "max_tokens": 8,
    }
    return {"custom_id": f"req-{i}", "method": "POST", "url": ENDPOINT, "body": request | body}


def jsonl(lines: list[dict[str, Any]] | list[dict[str, Any] | bytes]) -> bytes:
    return b"".join(
        (line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines
    )


def oai_for(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0, timeout=120)


def run_batch(oai: openai.OpenAI, lines: list[dict[str, Any]], endpoint: Any = ENDPOINT) -> Batch:
    file = oai.files.create(file=("requests.jsonl", jsonl(lines)), purpose="batch")
    return oai.batches.create(input_file_id=file.id, endpoint=endpoint, completion_window="24h")


def wait_batch(
    oai: openai.OpenAI, batch_id: str, until: Collection[str] = BATCH_ENDED, timeout: float = 180
) -> Batch:
    deadline = time.monotonic() + timeout
    while True:
        batch = oai.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}: {counts(batch)}"
        time.sleep(0.5)


def counts(batch: Batch) -> tuple[int, int, int]:
    """(total, completed, failed)."""
    assert batch.request_counts is not None
    return batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed


def records(oai: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    """The JSON lines of an output or error file (none for no file)."""
    if file_id is None:
        return []
    return [json.loads(row) for row in oai.files.content(file_id).content.splitlines()]
