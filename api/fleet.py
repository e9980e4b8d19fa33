"""What the API knows of the workers: the heartbeats they keep in Redis."""

from __future__ import annotations

import json
from typing import Any

from redis.asyncio import Redis

from core.broker import queue_keys
from core.queues import worker_pattern
from core.settings import Settings
from core.variants import Variant, VariantRegistry, weights_problem


async def live_workers(redis: Redis, settings: Settings) -> list[dict[str, Any]]:
    """Heartbeats of running workers (each expires a few seconds after its worker stops)."""
    out = []
    async for key in redis.scan_iter(match=worker_pattern(settings), count=100):
        raw = await redis.get(key)
        if raw:
            out.append(json.loads(raw))
    return out


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
