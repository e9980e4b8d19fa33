"""Workers for the warm variant cache's tests: two copies of real Whisper models (tiny.en and
base, see tests/helpers/variants.py:cache_test_variants) that no other worker serves, the fastest
real weights to load on a CPU; what /v1/models and a worker's log say of them."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from tests.helpers.jobs import audio_job
from tests.helpers.media import b64, tone_wav
from tests.helpers.stack import Stack, wait_job

TINY, BASE = "cache-whisper-tiny-en", "cache-whisper-base"
CLIP = b64(tone_wav(1.0))


@contextmanager
def worker(stack: Stack, *args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """A worker serving TINY and BASE (`env`: settings of its own); yields its name, and stops
    it afterwards."""
    name = f"cache-{uuid.uuid4().hex[:6]}@test"
    proc = stack.gemmaq("worker", "--variants", f"{TINY},{BASE}", "--device", "cpu", "--name", name, *args,
                        log=f"worker-{name}.log", env=env)  # fmt: skip
    try:
        yield name
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0
        stack.processes.remove(proc)


def states(client: httpx.Client, name: str) -> dict[str, dict[str, Any]]:
    """What /v1/models says of TINY and BASE on the worker `name`."""
    models = [m for m in client.get("/v1/models").json()["data"] if m["id"] in (TINY, BASE)]
    return {m["id"]: w for m in models for w in m["workers"] if w["worker"] == name}


def wait_states(client: httpx.Client, name: str, want: dict[str, str], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while {v: s["state"] for v, s in states(client, name).items()} != want:
        assert time.monotonic() < deadline, f"{name}: {states(client, name)}, want {want}"
        time.sleep(0.3)


def transcribe(client: httpx.Client, variant: str) -> Callable[[], dict[str, Any]]:
    body = audio_job({"data": CLIP}, variant=variant) | {"params": {"max_new_tokens": 4}}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return lambda: wait_job(client, response.json()["id"])


def run(client: httpx.Client, variant: str, name: str) -> dict[str, Any]:
    job = transcribe(client, variant)()
    assert job["status"] == "succeeded" and job["metrics"]["worker"] == name, job
    return job


def events(stack: Stack, name: str, event: str) -> list[dict[str, Any]]:
    lines = (stack.logs / f"worker-{name}.log").read_text().splitlines()
    return [e for e in (json.loads(x) for x in lines if x.startswith("{")) if e["event"] == event]
