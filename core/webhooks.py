"""Webhooks: which targets may be called, what is sent, how it is signed, when it is retried.

- Targets: http(s) URLs whose host resolves only to public addresses. Private, loopback,
  link-local (cloud metadata at 169.254.169.254 among them), multicast, reserved and unspecified
  addresses are refused — at submission, and again before every attempt (DNS may change) —
  unless `webhook_allow_hosts` names the host, the address or a block holding it. An attempt
  connects to the address it checked (`Target`), never to what a second lookup answers. A URL
  the sender could not use (no host, a bad port, spaces or control characters) is refused too.
- Events: `job.succeeded`, `job.failed` (an expired job too), `job.cancelled`; a Responses API
  job's are OpenAI's `response.completed`, `response.incomplete`, `response.failed`,
  `response.cancelled`; for batches `batch.completed`, `batch.failed`, `batch.expired`,
  `batch.cancelled`. The body is `{"type", "timestamp", "data": <the job, response or batch as
  GET /v1/jobs/{id}, /v1/responses/{id} or /v1/batches/{id} shows it>}`.
- Signing: the Standard Webhooks scheme (`webhook-id`, `webhook-timestamp`, `webhook-signature`),
  with the `standardwebhooks` package and the owner's `whsec_` secret.
- Retries: a non-2xx answer or no answer is retried after `webhook_backoff_s`, doubling up to
  `webhook_backoff_max_s`, for `webhook_max_attempts` attempts in all.
"""

from __future__ import annotations

import base64
import ipaddress
import secrets
import socket
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

import httpx
from standardwebhooks import Webhook

from core.errors import ValidationFailed
from core.openai_responses import status_for
from core.settings import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_URL_CHARS = 2000
EVENT_OF_STATUS = {
    "succeeded": "job.succeeded",
    "failed": "job.failed",
    "expired": "job.failed",
    "cancelled": "job.cancelled",
}
EVENT_OF_BATCH_STATUS = {
    "completed": "batch.completed",
    "failed": "batch.failed",
    "expired": "batch.expired",
    "cancelled": "batch.cancelled",
}


def job_event(status: str, response_id: str | None, finish_reason: str | None) -> str:
    """The event an ended job sends: a Responses API job's (`response_id`) in OpenAI's names."""
    if response_id is not None:
        return "response." + status_for(status, finish_reason)
    return EVENT_OF_STATUS[status]


class TargetRefused(ValidationFailed):
    """A webhook URL gemmaq will not call (a 422 at submission; a failed attempt at delivery)."""


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True)
class Target:
    """A webhook URL that passed the check, and the address it was checked at: the attempt
    connects there and nowhere else (a name that resolves again to a private address gets
    nothing)."""

    url: str
    host: str
    port: int
    address: str


def check_target(url: str, settings: Settings) -> Target:
    """The `Target` for `url`, or `TargetRefused` (resolves the host: call off the event loop)."""
    if len(url) > MAX_URL_CHARS or any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise TargetRefused(
            "webhook_url: at most 2000 characters, with no spaces or control characters",
            {"webhook_url": url[:200]},
        )
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        httpx.URL(url)  # what the sender will parse, so that a URL checked here can be sent to
    except (ValueError, httpx.InvalidURL) as exc:
        raise TargetRefused(f"webhook_url: not a valid URL ({exc})", {"webhook_url": url[:200]}) from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetRefused("webhook_url: an http or https URL with a host", {"webhook_url": url[:200]})
    if parts.username or parts.password:
        raise TargetRefused("webhook_url: credentials in the URL are not allowed")
    host = parts.hostname.lower().rstrip(".")
    allowed = [entry.lower() for entry in settings.webhook_allow_hosts]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, ValueError, UnicodeError) as exc:
        raise TargetRefused(f"webhook_url: {host!r} does not resolve", {"host": host}) from exc
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    if host not in allowed:
        for address in addresses:
            if not _public(address) and not _allowed(address, allowed):
                raise TargetRefused(
                    f"webhook_url: {host!r} is a private, loopback or link-local address "
                    "(allow it with GEMMAQ_WEBHOOK_ALLOW_HOSTS)",
                    {"host": host, "address": str(address)},
                )
    return Target(url=url, host=host, port=port, address=str(addresses[0]))


def _public(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return _public(address.ipv4_mapped)
    return address.is_global and not (address.is_multicast or address.is_reserved)


def _allowed(address: IPAddress, allowed: list[str]) -> bool:
    for entry in allowed:
        try:
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue  # a hostname: matched by name above
    return False


def signed_headers(secret: str, message_id: str, at: datetime, body: str) -> dict[str, str]:
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(message_id, at, body),
        "content-type": "application/json",
        "user-agent": "gemmaq-webhooks",
    }


def backoff_s(attempts: int, settings: Settings) -> float:
    """Seconds to wait after the `attempts`-th failed attempt."""
    return float(min(settings.webhook_backoff_s * 2 ** (attempts - 1), settings.webhook_backoff_max_s))
