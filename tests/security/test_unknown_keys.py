"""Finding 11: keys PostgreSQL does not know. A repeated unknown key is answered from the API's
memory, and random keys from one address are refused (429) past a limit, before they cost a
query; a key created a moment ago is never taken for an unknown one."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator

import httpx
import psycopg
import pytest
import redis

from core.keys import auth_failures_key
from tests.helpers.stack import Stack

pytestmark = pytest.mark.stack

ADDRESS = "127.0.0.1"  # the tests' client, as the API sees it


@contextlib.contextmanager
def _keys_locked(stack: Stack) -> Iterator[None]:
    """The keys table locked against every read: a request that looks a key up waits."""
    with psycopg.connect(stack.database_url) as conn, conn.transaction():
        conn.execute("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")
        yield


def _status(key: str, stack: Stack, timeout: float = 120) -> httpx.Response:
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout) as c:
        return c.get("/v1/jobs")


def _random_key() -> str:
    return "gq_" + secrets.token_urlsafe(32)


def _forget_failures(stack: Stack) -> None:
    settings = stack.settings()
    with redis.Redis.from_url(stack.redis_url) as r:
        r.delete(auth_failures_key(settings, ADDRESS))


def test_an_unknown_key_presented_again_costs_no_database_query(stack: Stack) -> None:
    _forget_failures(stack)
    bad = _random_key()
    try:
        assert _status(bad, stack).status_code == 401
        with _keys_locked(stack):  # answered without a lookup, or the request would wait
            for _ in range(20):
                assert _status(bad, stack, timeout=10).status_code == 401
    finally:
        _forget_failures(stack)


def test_random_keys_from_one_address_are_refused_past_the_limit_before_a_lookup(stack: Stack) -> None:
    limit = stack.settings().auth_failures_per_minute
    known = stack.new_key("known")
    _forget_failures(stack)
    assert _status(known, stack).status_code == 200
    try:
        assert [_status(_random_key(), stack).status_code for _ in range(limit)] == [401] * limit
        with _keys_locked(stack):
            for _ in range(20):
                response = _status(_random_key(), stack, timeout=10)
                assert response.status_code == 429
                assert response.json()["error"]["code"] == "RATE_LIMIT_EXCEEDED"
                assert 1 <= int(response.headers["retry-after"]) <= 60
        good = stack.new_key("blocked")  # a key never seen is not looked up, good or not
        assert _status(good, stack).status_code == 429
        # A tenant whose key the API took before, behind the same address (a proxy, a NAT),
        # is not locked out by another's failures, even once its cached entry has gone stale.
        assert _status(known, stack).status_code == 200
        stack.new_key("renew")  # renews the epoch: `known` is looked up again
        assert _status(known, stack).status_code == 200
    finally:
        _forget_failures(stack)
    assert _status(good, stack).status_code == 200  # the count gone (its minute over): let in
    assert _status(_random_key(), stack).status_code == 401
    _forget_failures(stack)


def test_a_key_created_after_its_digest_was_refused_is_taken_at_once(stack: Stack) -> None:
    """No one presents a key before it exists (keys are random), but the cache of unknown keys
    must not outlive a change: creating a key renews the epoch, and the API looks keys up again."""
    _forget_failures(stack)
    try:
        bad = _random_key()
        assert _status(bad, stack).status_code == 401
        good = stack.new_key("fresh")
        # the epoch moved: the unknown key is looked up again (and waits for the lock)
        with _keys_locked(stack), pytest.raises(httpx.ReadTimeout):
            _status(bad, stack, timeout=3)
        assert _status(good, stack).status_code == 200
    finally:
        _forget_failures(stack)
