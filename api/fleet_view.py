"""The workers' heartbeats as this API process last read them, for admission.

Submissions check that some worker can run the variant (`api.fleet.availability`). Reading every
heartbeat for every submission costs a SCAN and a GET per worker; this view reads them (SCAN +
one MGET) at most once per `FRESH_S`, shared by the requests in between. A heartbeat lives three
beats anyway, so the view is about as fresh as the heartbeats themselves. A variant the cached
view says cannot run is checked again against a fresh read before the caller is refused.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from redis.asyncio import Redis

from core.queues import worker_pattern
from core.settings import Settings

FRESH_S = 1.0


class FleetView:
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
            self._workers = await _read(self.redis, self.settings)
            self._read_at = started
        return self._workers


async def _read(redis: Redis, settings: Settings) -> list[dict[str, Any]]:
    keys = [key async for key in redis.scan_iter(match=worker_pattern(settings), count=100)]
    if not keys:
        return []
    return [json.loads(raw) for raw in await redis.mget(keys) if raw]
