"""The warm variant cache in real workers: a cold variant loads on demand beside the warm one
when the memory budget holds both; with room for one, the least recently used is evicted and
loads again when its jobs come back, and every job succeeds.

The workers serve two copies of real Whisper models (tiny.en and base, see
tests/helpers/variants.py:cache_test_variants) that no other worker serves: the fastest real
weights to load on a CPU.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from tests.helpers.jobs import audio_job
from tests.helpers.media import b64, tone_wav
from tests.helpers.stack import Stack, wait_job

pytestmark = pytest.mark.stack

TINY, BASE = "cache-whisper-tiny-en", "cache-whisper-base"
CLIP = b64(tone_wav(1.0))


@contextmanager
def worker(stack: Stack, *args: str) -> Iterator[str]:
    """A worker serving TINY and BASE; yields its name, and stops it afterwards."""
    name = f"cache-{uuid.uuid4().hex[:6]}@test"
    proc = stack.gemmaq("worker", "--variants", f"{TINY},{BASE}", "--device", "cpu", "--name", name, *args,
                        log=f"worker-{name}.log")  # fmt: skip
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


def test_second_variant_becomes_warm_without_reloading_the_first(stack: Stack, key: str) -> None:
    with stack.client(key) as c, worker(stack, "--memory-mb", "1000", "--preload", TINY) as name:
        wait_states(c, name, {TINY: "warm", BASE: "cold"})
        assert run(c, TINY, name)["metrics"]["load_ms"] is not None  # the first batch after its load
        assert run(c, BASE, name)["metrics"]["load_ms"] is not None  # loaded on demand
        assert run(c, TINY, name)["metrics"]["load_ms"] is None  # still warm: not loaded again
        now = states(c, name)
        assert {v: s["state"] for v, s in now.items()} == {TINY: "warm", BASE: "warm"}
        for s in now.values():
            assert s["resident_mb"] > 50 and s["resident_mb"] == s["memory_mb"] and s["last_used_at"]
    loaded = events(stack, name, "variant.loaded")
    assert [e["variant"] for e in loaded] == [TINY, BASE]
    assert all(e["load_ms"] > 0 and e["memory_bytes"] > 50 * 2**20 for e in loaded)
    assert events(stack, name, "variant.evicted") == []


def test_budget_for_one_evicts_the_least_recently_used_and_reloads_it(stack: Stack, key: str) -> None:
    # 450 MiB: TINY (~220 measured) and BASE (~378 measured, their heads prepacked) fit one at a time.
    with stack.client(key) as c, worker(stack, "--memory-mb", "450") as name:
        wait_states(c, name, {TINY: "warm", BASE: "cold"})
        for variant in (BASE, TINY, BASE):
            job = run(c, variant, name)
            assert job["metrics"]["load_ms"] is not None, "each one was evicted, then loaded again"
        assert {v: s["state"] for v, s in states(c, name).items()} == {TINY: "cold", BASE: "warm"}
        # Jobs of both at once: those of the cold one wait for the warm one's batch, then its load.
        waits = [transcribe(c, v) for v in (TINY, BASE, TINY, BASE)]
        with ThreadPoolExecutor(len(waits)) as pool:
            jobs = list(pool.map(lambda wait: wait(), waits))
        assert all(j["status"] == "succeeded" and j["metrics"]["worker"] == name for j in jobs), jobs
        assert sum(1 for s in states(c, name).values() if s["state"] == "warm") == 1
    evicted = events(stack, name, "variant.evicted")
    assert len(evicted) >= 3 and all("least recently used" in e["reason"] for e in evicted)
    loaded = [e["variant"] for e in events(stack, name, "variant.loaded")]
    assert loaded[:4] == [TINY, BASE, TINY, BASE] and len(loaded) == len(evicted) + 1
