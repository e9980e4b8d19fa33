"""The webhook dispatcher: one of the duties (workers/reconciler.py `Duties`), in its own thread.

Each round it makes a pending delivery for every job with a `webhook_url` that has ended since
the last round (a delivery exists iff a job with a webhook ended: made from the jobs table, so
no path that ends a job has to remember it), then hands the deliveries that are due to its
senders and goes on: a round never waits for an attempt, so a receiver that stalls until the
time limit holds up no one else's. Each user has at most `PER_USER` attempts in flight, so one
user's stalling receivers take at most that many senders. Every attempt is recorded on its
delivery (`GET /v1/webhooks/deliveries`); a failed one is due again after the backoff of
core/webhooks.py. Several dispatchers may run: a due delivery is taken by one (SKIP LOCKED) and
pushed past its attempt's time limit meanwhile.
"""

from __future__ import annotations

import collections
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx
import structlog
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from core.openai_batch import batch_out
from core.openai_responses import response_of
from core.schemas import JobOut
from core.settings import Settings
from core.webhooks import Target, TargetRefused, backoff_s, check_target, new_secret, signed_headers
from db.models import Batch
from db.repo import batches as batches_repo
from db.repo import jobs as jobs_repo
from db.repo import responses as responses_repo
from db.repo import webhooks as webhooks_repo
from db.session import sync_sessionmaker

log = structlog.get_logger(__name__)

LOOKBACK = timedelta(days=1)  # at start: jobs that ended this recently still get their webhook
SLACK = timedelta(seconds=30)  # jobs committed a little out of finish-time order are not missed
SENDERS = 16
MAX_RESPONSE_BYTES = 64 * 1024  # of a receiver's answer, read before it is let go
PER_USER = 4  # of one user's attempts in flight: users take turns


@dataclass(frozen=True)
class _Due:
    id: str
    user_id: str
    job_id: str | None
    batch_id: str | None
    event: str
    url: str
    attempts: int
    payload: str | None


class Dispatcher:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.maker = sync_sessionmaker(settings.db_url)
        self.tls = httpx.create_ssl_context()
        self.senders = ThreadPoolExecutor(SENDERS, thread_name_prefix="webhook")
        self.since = datetime.now(UTC) - LOOKBACK
        self._lock = threading.Lock()
        self._in_flight: collections.Counter[str] = collections.Counter()  # user id → attempts

    def run_forever(self, stop: threading.Event, active: Callable[[], bool] = lambda: True) -> None:
        """Rounds every `webhook_interval_s` while `active()` (this process holds the duties)."""
        while not stop.wait(self.settings.webhook_interval_s):
            if not active():
                continue
            try:
                self.once()
            except OperationalError as exc:
                log.warning("webhooks.waiting", error=type(exc).__name__)
            except Exception:
                log.exception("webhooks.round_failed")
        self.senders.shutdown(wait=True)

    def once(self) -> int:
        """One round: deliveries made for newly ended jobs, due ones handed to the senders; how
        many were handed over."""
        with self.maker.begin() as session:
            _, latest = webhooks_repo.create_for_ended(
                session=session, since=self.since - SLACK, max_pending=self.settings.webhook_max_pending
            )
        if latest is not None:
            self.since = max(self.since, latest)
        with self._lock:
            busy = dict(self._in_flight)
            free = SENDERS - sum(busy.values())
        if free <= 0:
            return 0
        with self.maker.begin() as session:
            lease = self.settings.webhook_timeout_s + 30
            due = [
                _Due(d.id, d.user_id, d.job_id, d.batch_id, d.event, d.url, d.attempts, d.payload)
                for d in webhooks_repo.claim_due(
                    session=session, limit=free, per_user=PER_USER, lease_s=lease, busy=busy
                )
            ]
        with self._lock:
            self._in_flight.update(d.user_id for d in due)
        for d in due:
            self.senders.submit(self._attempt, d)
        return len(due)

    def _attempt(self, d: _Due) -> None:
        try:
            self._try(d)
        finally:
            with self._lock:
                self._in_flight[d.user_id] -= 1
                if self._in_flight[d.user_id] <= 0:
                    del self._in_flight[d.user_id]

    def _try(self, d: _Due) -> None:
        try:
            with self.maker.begin() as session:
                payload = d.payload or self._payload(session, d)
                secret = webhooks_repo.secret_of(session=session, user_id=d.user_id, new=new_secret())
            outcome = self._send(d, payload, secret)
            attempts = d.attempts + 1
            delivered = outcome["status_code"] is not None and 200 <= outcome["status_code"] < 300
            retry = (
                None
                if delivered or attempts >= self.settings.webhook_max_attempts
                else backoff_s(attempts, self.settings)
            )
            with self.maker.begin() as session:
                webhooks_repo.record_attempt(
                    session=session, delivery_id=d.id, payload=payload, attempt=outcome, delivered=delivered,
                    retry_in_s=retry,
                )  # fmt: skip
            log.info(
                "webhook.attempted", delivery_id=d.id, job_id=d.job_id, user_id=d.user_id, event=d.event,
                host=urlsplit(d.url).hostname, attempt=attempts, status_code=outcome["status_code"],
                delivered=delivered, gave_up=not delivered and retry is None,
            )  # fmt: skip
        except Exception:  # this delivery is due again when its lease passes
            log.exception("webhook.attempt_failed", delivery_id=d.id, job_id=d.job_id)

    def _payload(self, session: Session, d: _Due) -> str:
        data: dict[str, Any] = {"id": d.job_id or d.batch_id}
        if d.job_id is not None:
            row = jobs_repo.get_job_sync(session=session, user_id=d.user_id, job_id=d.job_id)
            if row is not None:
                job = JobOut.model_validate(jobs_repo.job_fields(row))
                data = job.model_dump(mode="json")
                stored = responses_repo.of_job_sync(session=session, job_id=job.id)
                if d.event.startswith("response.") and stored is not None:  # as GET /v1/responses/{id}
                    data = response_of(stored, job, created_at=stored.created_at)
        elif d.batch_id is not None and (batch := session.get(Batch, d.batch_id)) is not None:
            counts = batches_repo.counts_sync(session=session, batch_id=batch.id)
            data = batch_out(batch, counts).model_dump(mode="json")
        return json.dumps({"type": d.event, "timestamp": datetime.now(UTC).isoformat(), "data": data})

    def _send(self, d: _Due, payload: str, secret: str) -> dict[str, Any]:
        at = datetime.now(UTC)
        started = time.monotonic()
        code: int | None = None
        error: str | None = None
        try:
            target = check_target(d.url, self.settings)  # again: what the name resolves to may have changed
            headers = signed_headers(secret, d.id, at, payload)
            deadline = started + self.settings.webhook_timeout_s
            code = post(target, payload.encode(), headers, deadline, self.tls)
            if not 200 <= code < 300:
                error = f"HTTP {code}"
        except TargetRefused as exc:
            error = f"refused: {exc.message}"
        except Exception as exc:  # whatever the cause, this attempt failed: recorded, retried later
            error = f"{type(exc).__name__}: {exc}"[:300]
        ms = round((time.monotonic() - started) * 1000, 1)
        return {"at": at.isoformat(), "status_code": code, "error": error, "ms": ms}


def post(target: Target, body: bytes, headers: dict[str, str], deadline: float, tls: ssl.SSLContext) -> int:
    """POST `body` to the target's checked address (TLS still verifies the URL's host) and read
    the answer, all of it before `deadline` (monotonic) and at most `MAX_RESPONSE_BYTES` of its
    body: a receiver that trickles, or streams without end, fails the attempt. Returns the
    status code."""
    url = httpx.URL(target.url)
    left = max(deadline - time.monotonic(), 0.001)
    with (
        httpcore.ConnectionPool(ssl_context=tls, network_backend=_Pinned(target.address, deadline)) as pool,
        pool.stream(
            "POST",
            httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path),
            headers=[(b"host", url.netloc), *((k.encode(), v.encode()) for k, v in headers.items())],
            content=body,
            extensions={"timeout": {"connect": left, "read": left, "write": left, "pool": left}},
        ) as response,
    ):
        read = 0
        for chunk in response.iter_stream():
            read += len(chunk)
            if read > MAX_RESPONSE_BYTES:
                raise ResponseTooLarge(f"the response is more than {MAX_RESPONSE_BYTES} bytes")
        return response.status


class ResponseTooLarge(Exception):
    pass


class _Pinned(httpcore.NetworkBackend):
    """Connects to one address, whatever host the URL names; every read and write ends by the
    attempt's deadline (a receiver that trickles a byte a second gets no more time)."""

    def __init__(self, address: str, deadline: float) -> None:
        self.address, self.deadline = address, deadline
        self._backend = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._backend.connect_tcp(
            self.address, port, _left(self.deadline, timeout), local_address, socket_options
        )
        return _Deadline(stream, self.deadline)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("webhooks are not sent over Unix sockets")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class _Deadline(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream, deadline: float) -> None:
        self._stream, self.deadline = stream, deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _left(self.deadline, timeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _left(self.deadline, timeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        tls = self._stream.start_tls(ssl_context, server_hostname, _left(self.deadline, timeout))
        return _Deadline(tls, self.deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


def _left(deadline: float, timeout: float | None) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise httpcore.TimeoutException("the attempt's time limit passed")
    return left if timeout is None else min(timeout, left)
