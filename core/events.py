"""A job's events — status changes and generated text — as a Redis stream per job.

Whoever moves a job appends its status (the API: `queued`, and `cancelled` for a queued job; the
worker: `running`, then the terminal status; the reconciler: the statuses it ends jobs in), and
the worker appends text deltas as a continuous batch generates them. `GET /v1/jobs/{id}/events`
(api/routers/events.py) and streamed chat completions read the stream: an entry's id is the
Server-Sent Events id, so a client that reconnects with `Last-Event-ID` reads on from there
and gets nothing twice. The deltas of a job, joined, are its result's text.

Appends are queued on a pipeline the caller already sends (no round trip of their own), or,
for terminal statuses, made by core/metrics.py's script; a stream expires `events_ttl_s` after
its job was queued or ended, whichever is later.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from core.keys import events_key
from core.settings import Settings

MAX_ENTRIES = 8192  # a stream is trimmed past this (approximately): more than any job's deltas
STATUS, DELTA = "status", "delta"


class Pipe(Protocol):
    """What appending needs of a Redis pipeline (sync or asyncio: commands only queue)."""

    def xadd(self, name: str, fields: Any, *, maxlen: int | None = ..., approximate: bool = ...) -> Any: ...

    def expire(self, name: str, time: int) -> Any: ...


def add_status(
    pipe: Pipe,
    settings: Settings,
    job_id: str,
    status: str,
    *,
    expire: bool = True,
    attempt: int | None = None,
) -> None:
    """`expire=False`: leave the stream's time to live as it is (set when the job was queued,
    renewed when it ends) — one command less on a hot path. `running` carries its attempt."""
    data: dict[str, Any] = {"status": status}
    if attempt is not None:
        data["attempt"] = attempt
    _add(pipe, settings, job_id, STATUS, data, expire=expire)


def status_data(status: str) -> str:
    """A status event's data (as scripts that append one write it)."""
    return json.dumps({"status": status})


def add_delta(pipe: Pipe, settings: Settings, job_id: str, text: str, attempt: int | None = None) -> None:
    """Text of the attempt that generated it: a job run again after its worker was lost starts
    over with a `running` status of a higher attempt, and readers drop what an older one sent."""
    data: dict[str, Any] = {"text": text}
    if attempt is not None:
        data["attempt"] = attempt
    _add(pipe, settings, job_id, DELTA, data)


def _add(
    pipe: Pipe, settings: Settings, job_id: str, event: str, data: dict[str, Any], *, expire: bool = True
) -> None:
    key = events_key(settings, job_id)
    pipe.xadd(key, {"event": event, "data": json.dumps(data)}, maxlen=MAX_ENTRIES, approximate=True)
    if expire:
        pipe.expire(key, settings.events_ttl_s)


def parse(fields: dict[bytes, bytes]) -> tuple[str, dict[str, Any]]:
    """An entry's (event, data)."""
    return fields[b"event"].decode(), json.loads(fields[b"data"])
