"""Finding 8: a tenant alternating tiny jobs between two variants that do not fit together made
the worker load one, then the other, back and forth, and no batch of any variant runs during a
load. Each user's jobs may make `loads_per_user_per_hour` device loads; past them, a job that
would load its variant waits in the queue (its attempt given back), and runs once its variant
is warm (another user's job loaded it) or the user's hour has room again.

The worker serves two copies of real Whisper models, with memory for one at a time (as in
tests/test_variant_cache.py)."""

from __future__ import annotations

import time

import pytest

from tests.helpers.cache_workers import BASE, CLIP, TINY, events, states, transcribe, wait_states, worker
from tests.helpers.jobs import audio_job
from tests.helpers.stack import Stack, wait_job

pytestmark = pytest.mark.stack

LOADS = 2


def test_a_users_device_loads_are_bounded_and_the_job_waits_its_turn(stack: Stack) -> None:
    thrasher, other = stack.new_key("thrash"), stack.new_key("other")
    env = {"GEMMAQ_LOADS_PER_USER_PER_HOUR": str(LOADS)}
    with (
        stack.client(thrasher) as a,
        stack.client(other) as b,
        worker(stack, "--memory-mb", "450", env=env) as name,
    ):
        wait_states(a, name, {TINY: "warm", BASE: "cold"})  # loaded at start: no user's load
        for variant in (BASE, TINY):  # the thrasher's two loads for the hour
            job = transcribe(a, variant)()
            assert job["status"] == "succeeded" and job["metrics"]["load_ms"] is not None, job
        body = audio_job({"data": CLIP}, variant=BASE) | {"params": {"max_new_tokens": 4}}
        waiting = a.post("/v1/jobs", json=body)
        assert waiting.status_code == 202, waiting.text
        held = waiting.json()["id"]
        time.sleep(8)
        job = a.get(f"/v1/jobs/{held}").json()
        assert job["status"] == "queued" and job["attempts"] == 0, job  # held back, not charged
        assert {v: s["state"] for v, s in states(a, name).items()} == {TINY: "warm", BASE: "cold"}
        assert [e["variant"] for e in events(stack, name, "variant.loaded")] == [TINY, BASE, TINY]
        # Another user's job loads BASE (its own load); the held job then runs without one.
        assert transcribe(b, BASE)()["status"] == "succeeded"
        done = wait_job(a, held, timeout=120)
        assert done["status"] == "succeeded" and done["attempts"] == 1, done
    # No load of its own: the one BASE load after the thrasher's two is the other user's.
    assert [e["variant"] for e in events(stack, name, "variant.loaded")] == [TINY, BASE, TINY, BASE]
    returned = events(stack, name, "job.returned")
    assert returned and all(e["job_id"] == held and "device loads" in e["reason"] for e in returned)
