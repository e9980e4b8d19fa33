"""With PostgreSQL or Redis away, the API answers 503 in the envelope, quickly — never a 500 or a hang."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from api.app import create_app
from core.settings import Settings
from tests.conftest import Stack
from tests.test_api_errors import assert_envelope

NOWHERE_REDIS = "redis://127.0.0.1:1/0"
NOWHERE_PG = "postgresql://postgres@127.0.0.1:1/nothing"
JOB = {"variant": "echo", "input": {"prompt": "hi"}}


def _app(stack: Stack, **overrides: str) -> TestClient:
    settings = Settings(
        database_url=overrides.get("database_url", stack.database_url),
        redis_url=overrides.get("redis_url", stack.redis_url),
        namespace=stack.namespace,
    )
    return TestClient(create_app(settings), raise_server_exceptions=False)


def test_redis_down_is_503(stack: Stack) -> None:
    key = stack.new_key()
    with _app(stack, redis_url=NOWHERE_REDIS) as api:
        auth = {"Authorization": f"Bearer {key}"}
        start = time.monotonic()
        assert_envelope(api.post("/v1/jobs", json=JOB, headers=auth), 503, "UNAVAILABLE")
        assert time.monotonic() - start < 10
        ready = api.get("/readyz")
        error = assert_envelope(ready, 503, "UNAVAILABLE")
        assert error["details"]["checks"]["postgres"] == "ok"
        assert error["details"]["checks"]["redis"].startswith("down")
        assert api.get("/v1/jobs", headers=auth).status_code == 200  # reads need only PostgreSQL


def test_postgres_down_is_503(stack: Stack) -> None:
    with _app(stack, database_url=NOWHERE_PG) as api:
        start = time.monotonic()
        response = api.post("/v1/jobs", json=JOB, headers={"Authorization": "Bearer gq_anything"})
        assert_envelope(response, 503, "UNAVAILABLE")
        assert time.monotonic() - start < 10
        assert_envelope(api.get("/readyz"), 503, "UNAVAILABLE")
        assert api.get("/healthz").status_code == 200
