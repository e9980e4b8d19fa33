"""What holds a connection open for long — Server-Sent Events streams and held waits (`?wait=`,
non-streamed chat completions) — capped per user in each API process.

Past a user's cap the request is refused 429 `QUOTA_EXCEEDED` with `Retry-After`, so one
tenant's thousand open streams cost another tenant nothing. Every stream blocks on Redis a
while at a time and so holds one of the process's pooled connections: all users' streams
together stay under half the pool (`redis_max_connections`), which bounds Redis's clients and
leaves the rest for everything else. A stream re-checks its caller's key every `RECHECK_S`
and ends once the key is revoked.
"""

from __future__ import annotations

import collections
import json
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

from sse_starlette import ServerSentEvent
from starlette.requests import Request

from api.auth import Authenticator
from core.errors import QuotaExceeded, Unavailable
from core.settings import Settings

Kind = Literal["stream", "wait"]
RECHECK_S = 15.0  # a stream's key is checked again this often (revocations end it within 30 s)
RETRY_AFTER_S = 5


class KeyRevoked(Exception):
    """The key a stream was opened with is no longer valid: the stream ends."""


@dataclass
class Hold:
    """One stream's or wait's place under the caps; `release` gives it back (once)."""

    holds: Holds
    kind: Kind
    user_id: str
    weight: int = 1  # the streams or waits it stands for (a request that follows several jobs)
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.holds.give_back(self)

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


@dataclass
class Holds:
    settings: Settings
    _by_user: collections.Counter[tuple[Kind, str]] = field(default_factory=collections.Counter)
    _all: collections.Counter[Kind] = field(default_factory=collections.Counter)

    def take(self, kind: Kind, user_id: str, weight: int = 1) -> Hold:
        """A place for `weight` more streams or waits of `user_id` (one per job a request follows:
        each blocks on Redis on its own), or 429 (503 when the process's streams are at their
        total)."""
        cap = self.settings.max_streams_per_user if kind == "stream" else self.settings.max_waits_per_user
        held = self._by_user[(kind, user_id)]
        if held + weight > cap:
            limit = "max_streams_per_user" if kind == "stream" else "max_waits_per_user"
            raise QuotaExceeded(
                f"you have {held} open {'streams' if kind == 'stream' else 'waiting requests'}; "
                f"at most {cap} at a time",
                {"limit": limit, "value": cap, "retry_after_s": RETRY_AFTER_S},
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        if kind == "stream" and self._all[kind] + weight > self.settings.redis_max_connections // 2:
            raise Unavailable(
                "this API process holds as many streams as it can; retry shortly",
                {"retry_after_s": RETRY_AFTER_S},
                {"Retry-After": str(RETRY_AFTER_S)},
            )
        self._by_user[(kind, user_id)] += weight
        self._all[kind] += weight
        return Hold(self, kind, user_id, weight)

    def give_back(self, hold: Hold) -> None:
        key = (hold.kind, hold.user_id)
        self._by_user[key] -= hold.weight
        if self._by_user[key] <= 0:
            del self._by_user[key]
        self._all[hold.kind] -= hold.weight


class KeyWatch:
    """A stream's check that the key it was opened with still holds: `check` looks again at
    most every `RECHECK_S` and raises `KeyRevoked` once it does not."""

    def __init__(self, request: Request) -> None:
        self._auth: Authenticator = request.app.state.auth
        self._key = request.headers.get("authorization", "").partition(" ")[2].strip()
        self._checked = time.monotonic()

    async def check(self) -> None:
        if time.monotonic() - self._checked < RECHECK_S:
            return
        self._checked = time.monotonic()
        if await self._auth(self._key) is None:
            raise KeyRevoked


def guarded(
    frames: AsyncIterator[ServerSentEvent], hold: Hold, watch: KeyWatch
) -> AsyncIterator[ServerSentEvent]:
    """A stream's frames under its hold: the key checked between frames (and by the re-reads
    that `watch` guards), the hold given back when the stream ends — or, for a stream that
    never started, when it is let go."""

    async def run() -> AsyncIterator[ServerSentEvent]:
        try:
            async for frame in frames:
                await watch.check()
                yield frame
        except KeyRevoked:
            error = {"code": "UNAUTHORIZED", "message": "the API key was revoked", "details": {}}
            yield ServerSentEvent(event="error", data=json.dumps({"error": error}))
        finally:
            hold.release()

    stream = run()
    weakref.finalize(stream, hold.release)
    return stream
