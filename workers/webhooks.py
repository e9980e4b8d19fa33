"""The webhook dispatcher: runs beside the reconciler (its own thread in that process).

Each round it makes a pending delivery for every job with a `webhook_url` that has ended since
the last round (a delivery exists iff a job with a webhook ended: made from the jobs table, so
no path that ends a job has to remember it), then attempts the deliveries that are due, a few
at a time. Every attempt is recorded on its delivery (`GET /v1/webhooks/deliveries`); a failed
one is due again after the backoff of core/webhooks.py. Several dispatchers may run: a due
delivery is taken by one (SKIP LOCKED) and pushed past its attempt's time limit meanwhile.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
import structlog
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from core.openai_batch import batch_out
from core.settings import Settings
from core.webhooks import TargetRefused, backoff_s, check_target, new_secret, signed_headers
from db.models import Batch
from db.repo import batches as batches_repo
from db.repo import jobs as jobs_repo
from db.repo import webhooks as webhooks_repo
from db.session import sync_sessionmaker

log = structlog.get_logger(__name__)

LOOKBACK = timedelta(days=1)  # at start: jobs that ended this recently still get their webhook
SLACK = timedelta(seconds=30)  # jobs committed a little out of finish-time order are not missed
SENDERS = 8
PER_ROUND = 32


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
        self.http = httpx.Client(timeout=settings.webhook_timeout_s, follow_redirects=False)
        self.senders = ThreadPoolExecutor(SENDERS, thread_name_prefix="webhook")
        self.since = datetime.now(UTC) - LOOKBACK

    def start(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self.run_forever, args=(stop,), name="webhooks", daemon=True)
        thread.start()
        return thread

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.wait(self.settings.webhook_interval_s):
            try:
                self.once()
            except OperationalError as exc:
                log.warning("webhooks.waiting", error=type(exc).__name__)
            except Exception:
                log.exception("webhooks.round_failed")
        self.senders.shutdown(wait=True)
        self.http.close()

    def once(self) -> int:
        """One round: deliveries made for newly ended jobs, due ones attempted; how many attempted."""
        with self.maker.begin() as session:
            _, latest = webhooks_repo.create_for_ended(session=session, since=self.since - SLACK)
        if latest is not None:
            self.since = max(self.since, latest)
        with self.maker.begin() as session:
            lease = self.settings.webhook_timeout_s + 30
            due = [
                _Due(d.id, d.user_id, d.job_id, d.batch_id, d.event, d.url, d.attempts, d.payload)
                for d in webhooks_repo.claim_due(session=session, limit=PER_ROUND, lease_s=lease)
            ]
        list(self.senders.map(self._attempt, due))
        return len(due)

    def _attempt(self, d: _Due) -> None:
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
                data = jobs_repo.job_out(row).model_dump(mode="json")
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
            check_target(d.url, self.settings)  # again: what the name resolves to may have changed
            response = self.http.post(
                d.url, content=payload, headers=signed_headers(secret, d.id, at, payload)
            )
            code = response.status_code
            if not 200 <= code < 300:
                error = f"HTTP {code}"
        except TargetRefused as exc:
            error = f"refused: {exc.message}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:300]
        ms = round((time.monotonic() - started) * 1000, 1)
        return {"at": at.isoformat(), "status_code": code, "error": error, "ms": ms}
