"""Webhooks: which targets may be called, what is sent, how it is signed, when it is retried.

- Targets: http(s) URLs whose host resolves only to public addresses. Private, loopback,
  link-local (cloud metadata at 169.254.169.254 among them), multicast, reserved and unspecified
  addresses are refused — at submission, and again before every attempt (DNS may change) —
  unless `webhook_allow_hosts` names the host, the address or a block holding it.
- Events: `job.succeeded`, `job.failed` (an expired job too), `job.cancelled`, and for batches
  `batch.completed`, `batch.failed` (an expired batch too), `batch.cancelled`; the body is
  `{"type", "timestamp", "data": <the job or batch as GET /v1/jobs/{id} or /v1/batches/{id} shows it>}`.
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
from datetime import datetime
from urllib.parse import urlsplit

from standardwebhooks import Webhook

from core.errors import ValidationFailed
from core.settings import Settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
EVENT_OF_STATUS = {
    "succeeded": "job.succeeded",
    "failed": "job.failed",
    "expired": "job.failed",
    "cancelled": "job.cancelled",
}
EVENT_OF_BATCH_STATUS = {
    "completed": "batch.completed",
    "failed": "batch.failed",
    "expired": "batch.failed",
    "cancelled": "batch.cancelled",
}


class TargetRefused(ValidationFailed):
    """A webhook URL gemmaq will not call (a 422 at submission; a failed attempt at delivery)."""


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def check_target(url: str, settings: Settings) -> None:
    """Raise `TargetRefused` unless `url` may be called (resolves the host: call off the event loop)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetRefused("webhook_url: an http or https URL with a host", {"webhook_url": url[:200]})
    if parts.username or parts.password:
        raise TargetRefused("webhook_url: credentials in the URL are not allowed")
    host = parts.hostname.lower().rstrip(".")
    allowed = [entry.lower() for entry in settings.webhook_allow_hosts]
    if host in allowed:
        return
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, ValueError) as exc:
        raise TargetRefused(f"webhook_url: {host!r} does not resolve", {"host": host}) from exc
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if not _public(address) and not _allowed(address, allowed):
            raise TargetRefused(
                f"webhook_url: {host!r} is a private, loopback or link-local address "
                "(allow it with GEMMAQ_WEBHOOK_ALLOW_HOSTS)",
                {"host": host, "address": str(address)},
            )


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
