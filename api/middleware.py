"""Wrappers around every request, outermost first:
- `KeyFirst`: the caller's API key, checked before a byte of the body is read — a request to
  /v1/ without a valid key is answered 401 at once, however large the body it announces;
- `BodyLimit`: a cap on the body, enforced while it streams in (before any parsing): 413,
  whether the length is announced or the body comes chunked;
- `RateLimitHeaders`: the RateLimit-* headers on every authenticated response (from the
  caller's rate-limit window that authentication, then admission, `remember`);
- `TextOnly`: 422 for a JSON body with a string that is not text (a lone UTF-16 surrogate, or
  NUL), wherever in the body it is, before any route parses it (core/text_checks.py)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response, response_for
from core.quotas import Snapshot
from core.text_checks import suspect, text_problem

_DISCONNECT: Message = {"type": "http.disconnect"}
MISSING_KEY = "missing API key: send `Authorization: Bearer <key>`"


class KeyFirst:
    """Authenticates requests under `prefix` from their `Authorization: Bearer` header alone; the
    caller is left in the request's state for the routes (api/deps.py `authenticate`)."""

    def __init__(self, app: ASGIApp, *, prefix: str = "/v1/") -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        scheme, _, key = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            refusal = error_response(401, "UNAUTHORIZED", MISSING_KEY)
        else:
            try:
                client = scope.get("client")
                caller = await scope["app"].state.auth(key.strip(), client[0] if client else None)
            except Exception as exc:  # the database or Redis away: answered as the routes would be
                await (await response_for(Request(scope), exc))(scope, receive, send)
                return
            if caller is not None:
                scope.setdefault("state", {})["caller"] = caller
                await self.app(scope, receive, send)
                return
            refusal = error_response(401, "UNAUTHORIZED", "invalid or revoked API key")
        refusal.headers["www-authenticate"] = "Bearer"
        refusal.headers["connection"] = "close"  # the body it may be sending is never read
        await refusal(scope, receive, send)


class BodyLimit:
    """413 in the error envelope for a body over `limit` bytes (uploads get theirs: `uploads` maps
    a path prefix to its limit)."""

    def __init__(self, app: ASGIApp, *, limit: int, uploads: Mapping[str, int]) -> None:
        self.app = app
        self.limit = limit
        self.uploads = dict(uploads)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        limit = next((cap for prefix, cap in self.uploads.items() if path.startswith(prefix)), self.limit)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _refuse(send, limit)
            return
        seen = 0
        started = cut = answered = False

        async def counted() -> Message:
            nonlocal seen, cut, answered
            if cut:
                return _DISCONNECT
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # Answered here, whatever the app makes of a body that stops: 413, never
                    # the 400 or 422 of a body cut short.
                    cut = True
                    if not started:
                        answered = True
                        await _refuse(send, limit)
                    return _DISCONNECT
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            if answered:
                return  # the app's own answer to the cut body: the 413 went out instead
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except Exception:
            if not answered:  # a route that failed on the cut body: the 413 is the answer
                raise


async def _refuse(send: Send, limit: int) -> None:
    response = error_response(
        413, "PAYLOAD_TOO_LARGE", f"the request body is over {limit} bytes", {"limit": limit}
    )
    response.headers["connection"] = "close"  # the rest of the body is not read
    await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


def remember(request: Request, snapshot: Snapshot) -> None:
    """The RateLimit-* headers the response will carry (`RateLimitHeaders` adds them)."""
    request.state.ratelimit = snapshot.rate.headers()


def rate_headers(request: Request) -> Callable[[Snapshot], None]:
    """What admission is told the caller's window with: remembered for this request's response."""
    return functools.partial(remember, request)


class RateLimitHeaders:
    """Adds the headers that authentication or admission left in `request.state.ratelimit` —
    to every response, refusals and streams included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})

        async def with_headers(message: Message) -> None:
            headers = state.get("ratelimit") if message["type"] == "http.response.start" else None
            if headers:
                message["headers"] = [
                    *message.get("headers", []),
                    *((k.lower().encode(), v.encode()) for k, v in headers.items()),
                ]
            await send(message)

        await self.app(scope, receive, with_headers)


class TextOnly:
    """Reads a JSON body whole (`BodyLimit`, outside, caps it) and refuses it with 422 when a
    string in it is not text; passes it on unchanged otherwise. A body that is not valid JSON is
    left to the route, which answers it as before."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        content_type = dict(scope.get("headers", ())).get(b"content-type", b"").split(b";")[0].strip().lower()
        # FastAPI reads a body without a content type as JSON too.
        json_body = not content_type or content_type.endswith((b"/json", b"+json"))
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD") or not json_body:
            await self.app(scope, receive, send)
            return
        parts, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nothing to answer
                return
            parts.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(parts)
        if suspect(body):
            try:
                problem = text_problem(json.loads(body))
            except (ValueError, RecursionError):
                problem = None
            if problem is not None:
                where = problem if len(problem) <= 300 else problem[:300] + "…"
                await error_response(422, "VALIDATION_ERROR", where)(scope, receive, send)
                return
        replayed = False

        async def again() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, again, send)
