"""Prefixed, time-ordered, URL-safe ids (`job_…`, `usr_…`)."""

from __future__ import annotations

import secrets
import time

_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def _base36(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 36)
        out.append(_ALPHABET[r])
    return "".join(reversed(out))


def new_id(prefix: str) -> str:
    # 9 base-36 chars of milliseconds (sortable until 2140), then 80 random bits.
    return f"{prefix}_{_base36(time.time_ns() // 1_000_000, 9)}{_base36(secrets.randbits(80), 16)}"
