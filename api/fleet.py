"""What the API knows of the workers: the heartbeats they keep in Redis, the broker's queue
depths, and whether a variant can run.

Submissions check that some worker can run the variant (`availability`). Reading every heartbeat
for every submission costs a SCAN and an MGET; `FleetView` reads them at most once per `FRESH_S`,
shared by the requests in between. A heartbeat lives three beats anyway, so the view is about as
fresh as the heartbeats themselves. A variant the cached view says cannot run is checked again
against a fresh read before the caller is refused.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from redis.asyncio import Redis

from core.keys import queue_keys, worker_pattern
from core.settings import Settings
from core.variants import Variant, VariantRegistry, weights_problem

FRESH_S = 1.0


async def live_workers(redis: Redis, settings: Settings) -> list[dict[str, Any]]:
    """Heartbeats of running workers (each expires a few seconds after its worker stops)."""
    keys = [key async for key in redis.scan_iter(match=worker_pattern(settings), count=100)]
    if not keys:
        return []
    return [json.loads(raw) for raw in await redis.mget(keys) if raw]


class FleetView:
    """The live workers' heartbeats as this API process last read them, for admission."""

    def __init__(self, redis: Redis, settings: Settings, fresh_s: float = FRESH_S) -> None:
        self.redis = redis
        self.settings = settings
        self.fresh_s = fresh_s
        self._workers: list[dict[str, Any]] = []
        self._read_at = -float("inf")
        self._lock = asyncio.Lock()

    async def workers(self, *, fresh: bool = False) -> list[dict[str, Any]]:
        """The live workers' heartbeats: read at most `fresh_s` ago, or now with `fresh`."""
        asked = time.monotonic()
        if not fresh and asked - self._read_at < self.fresh_s:
            return self._workers
        async with self._lock:  # one read at a time; those who waited take its result
            if self._read_at >= asked or (not fresh and time.monotonic() - self._read_at < self.fresh_s):
                return self._workers
            started = time.monotonic()
            self._workers = await live_workers(self.redis, self.settings)
            self._read_at = started
        return self._workers


async def queue_depths(redis: Redis, settings: Settings, variants: list[str]) -> dict[str, int]:
    """Messages waiting in each variant's broker queue (all priority steps), one round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        for name in variants:
            for key in queue_keys(settings, name):
                pipe.llen(key)
        lengths = await pipe.execute()
    steps = len(lengths) // len(variants) if variants else 0
    return {name: sum(lengths[i * steps : (i + 1) * steps]) for i, name in enumerate(variants)}


def states_of(variant: str, workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"worker": w["worker"], "device": w["device"], **w["variants"][variant]}
        for w in workers
        if variant in w.get("variants", {})
    ]


def availability(variant: Variant, registry: VariantRegistry, workers: list[dict[str, Any]]) -> str | None:
    """None when the variant can run, else why not.

    A worker that serves the variant (warm, loading, or cold: it loads it when a job comes) is
    proof enough, whatever this API host holds; otherwise the weights must be present here.
    """
    states = states_of(variant.name, workers)
    if any(s["state"] in ("warm", "loading", "cold") for s in states):
        return None
    if states:
        return str(states[0].get("reason") or "no worker could load it")
    return weights_problem(variant, registry)
