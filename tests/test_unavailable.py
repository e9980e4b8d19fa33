"""With PostgreSQL or Redis away, the API answers 503 in the envelope, quickly — never a 500 or a hang."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from core.settings import Settings
from tests.helpers.http import assert_envelope
from tests.helpers.stack import Stack

NOWHERE_REDIS = "redis://127.0.0.1:1/0"
NOWHERE_PG = "postgresql://postgres@127.0.0.1:1/nothing"
JOB = {"variant": "echo", "input": {"prompt": "hi"}}


@contextmanager
def _app(*, database_url: str, redis_url: str, namespace: str) -> Iterator[TestClient]:
    """The API in this process (lifespan and all), on these servers."""
    app = create_app(Settings(database_url=database_url, redis_url=redis_url, namespace=namespace))
    with TestClient(app, raise_server_exceptions=False) as api:
        yield api


@pytest.mark.stack
def test_redis_down_is_503(stack: Stack) -> None:
    key = stack.new_key()
    with _app(database_url=stack.database_url, redis_url=NOWHERE_REDIS, namespace=stack.namespace) as api:
        auth = {"Authorization": f"Bearer {key}"}
        start = time.monotonic()
        assert_envelope(api.post("/v1/jobs", json=JOB, headers=auth), 503, "UNAVAILABLE")
        assert time.monotonic() - start < 10
        ready = api.get("/readyz")
        error = assert_envelope(ready, 503, "UNAVAILABLE")
        assert error["details"]["checks"]["postgres"] == "ok"
        assert error["details"]["checks"]["redis"].startswith("down")
        assert api.get("/v1/jobs", headers=auth).status_code == 200  # reads need only PostgreSQL


@pytest.mark.unit
def test_postgres_down_is_503(embedded_redis: str) -> None:
    with _app(
        database_url=NOWHERE_PG, redis_url=embedded_redis, namespace=f"unit-{uuid.uuid4().hex[:8]}"
    ) as api:
        start = time.monotonic()
        response = api.post("/v1/jobs", json=JOB, headers={"Authorization": "Bearer gq_anything"})
        assert_envelope(response, 503, "UNAVAILABLE")
        assert time.monotonic() - start < 10
        assert_envelope(api.get("/readyz"), 503, "UNAVAILABLE")
        assert api.get("/healthz").status_code == 200
