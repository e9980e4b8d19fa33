"""Asking a running job to stop, and hearing it.

The API (api/cancels.py) sets the job's cancel flag to the time it asked and announces the job's
id on the cancel channel. A worker's shell (workers/shell/pool.py) hears the announcement at once,
reads the flags of the jobs it holds at each poll (whatever it missed), and passes each time it
finds to its engine, which stops that row at its next decoding step. db/endings.py clears the flag
when the job ends. The key and channel names are in core/keys.py.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import redis
import redis.asyncio

from core.keys import cancel_channel, cancel_key
from core.settings import Settings

Pipeline = redis.client.Pipeline | redis.asyncio.client.Pipeline


def ask(pipe: Pipeline, settings: Settings, job_id: str) -> None:
    """Queue on `pipe` the flag (kept as long as a broker message may be redelivered) and the
    announcement; the caller executes it."""
    pipe.set(cancel_key(settings, job_id), time.time(), ex=settings.visibility_timeout_s)
    pipe.publish(cancel_channel(settings), job_id)


def asked(client: redis.Redis, settings: Settings, job_ids: Sequence[str]) -> dict[str, float]:
    """The jobs among `job_ids` asked to stop, each with the time it was asked."""
    if not job_ids:
        return {}
    values = client.mget([cancel_key(settings, j) for j in job_ids])
    found = {job_id: requested_at(value) for job_id, value in zip(job_ids, values, strict=True)}
    return {job_id: at for job_id, at in found.items() if at is not None}


def subscribe(pubsub: redis.client.PubSub, settings: Settings) -> None:
    """Listen on `pubsub` for announcements (`announced` reads them)."""
    pubsub.subscribe(cancel_channel(settings))


def announced(message: object) -> str | None:
    """The job id a message heard on the cancel channel names (None: not an announcement)."""
    if not isinstance(message, dict) or message.get("type") != "message":
        return None
    data = message.get("data")
    return data.decode() if isinstance(data, bytes) else None


def requested_at(value: bytes | str | None) -> float | None:
    """The time a cancel flag holds (None: not set; 0: set by something else — stop at once)."""
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return 0.0
