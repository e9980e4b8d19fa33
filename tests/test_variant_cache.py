"""The warm variant cache in real workers: a cold variant loads on demand beside the warm one
when the memory budget holds both; with room for one, the least recently used is evicted and
loads again when its jobs come back, and every job succeeds.

The workers serve two copies of real Whisper models (tiny.en and base, see
tests/helpers/variants.py:cache_test_variants) that no other worker serves: the fastest real
weights to load on a CPU.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers.cache_workers import BASE, TINY, events, run, states, transcribe, wait_states, worker
from tests.helpers.stack import Stack

pytestmark = pytest.mark.stack


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
