"""Following a job's events (core/events.py) as they come, for Server-Sent Events and streamed
chat completions.

`follow` yields the stream's entries after a cursor (an entry id, from `Last-Event-ID`), then,
once the job is terminal, a last `done` with the whole job. It blocks on the stream a short while
at a time and re-reads the job between blocks, so a job whose end never reached Redis (Redis
away when it ended, or its events expired) still ends the stream: its status and `done` are
then made from the row.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from core import (
    events,
    keys,
)
from core.errors import ValidationFailed
from core.schemas import TERMINAL_STATUSES, JobOut
from core.settings import Settings

log = structlog.get_logger(__name__)

BLOCK_MS = 2000  # one blocking read; under the API's Redis socket timeout
BATCH = 512  # entries per read
REDIS_RETRY_S = 1.0
EVENT_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
T = TypeVar("T")


@dataclass(frozen=True)
class Event:
    id: str | None  # the stream entry's id; None for events made from the job row
    event: str  # "status", "delta" or "done"
    data: dict[str, Any]


def cursor_of(last_event_id: str | None) -> str:
    """Where to read from: after `Last-Event-ID`, or from the start."""
    if last_event_id is None:
        return "0-0"
    if not EVENT_ID.match(last_event_id):
        raise ValidationFailed(
            "Last-Event-ID: not an event id this API handed out", {"last_event_id": last_event_id}
        )
    return last_event_id


async def follow(
    redis: Redis, settings: Settings, job: JobOut, read: Callable[[], Awaitable[JobOut]], cursor: str
) -> AsyncIterator[Event]:
    """The job's events after `cursor`, then `done`; `read` re-reads the job (its row)."""
    key = keys.events_key(settings, job.id)
    terminal = job.status in TERMINAL_STATUSES
    attempt = 0  # the latest attempt a `running` status announced: older attempts' text is dropped
    while True:
        reply: Any
        try:
            reply = await redis.xread({key: cursor}, count=BATCH, block=None if terminal else BLOCK_MS)
        except RedisError as exc:
            log.warning("job.events_unreadable", job_id=job.id, error=type(exc).__name__)
            await asyncio.sleep(REDIS_RETRY_S)
            reply = []
            if not terminal:
                job = await read()
                terminal = job.status in TERMINAL_STATUSES
            if not terminal:
                continue
        entries = _entries(reply)
        for entry_id, fields in entries:
            cursor = entry_id.decode()
            event, data = events.parse(fields)
            if event == events.STATUS and data.get("status") == "running":
                attempt = max(attempt, int(data.get("attempt") or 0))
            if event == events.DELTA and int(data.get("attempt") or attempt) < attempt:
                continue  # a lost attempt's text, published late
            yield Event(cursor, event, data)
            if event == events.STATUS and data["status"] in TERMINAL_STATUSES:
                yield Event(None, "done", (await read()).model_dump(mode="json"))
                return
        if len(entries) == BATCH:
            continue  # more may be waiting
        if terminal:  # ended, and its terminal event is not in the stream: made from the row
            job = await read()
            yield Event(None, events.STATUS, {"status": job.status})
            yield Event(None, "done", job.model_dump(mode="json"))
            return
        if not entries:
            job = await read()
            terminal = job.status in TERMINAL_STATUSES


def _entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """XREAD's entries for the one stream read (RESP2 list or RESP3 map)."""
    if not reply:
        return []
    per_stream = next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1]
    return [(entry_id, fields) for entry_id, fields in per_stream if fields]


async def merged(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """The items of several streams as each comes, with the index of the stream it came from
    (each stream's own order kept); the streams still open are closed when this one is."""
    ahead = {asyncio.ensure_future(anext(stream)): i for i, stream in enumerate(streams)}
    try:
        while ahead:
            ready, _ = await asyncio.wait(ahead, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(ready, key=lambda t: ahead[t]):
                i = ahead.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    continue
                yield i, item
                ahead[asyncio.ensure_future(anext(streams[i]))] = i
    finally:
        for task in ahead:
            task.cancel()
        await asyncio.gather(*ahead, return_exceptions=True)
        for stream in streams:
            closing = getattr(stream, "aclose", None)
            if closing is not None:
                with contextlib.suppress(Exception):
                    await closing()
