"""Every timestamp a tenant sends is bounded before anything is stored: a far-future
`expires_at` (PostgreSQL would store year 10000, which the driver cannot read back) is a 422,
the tenant's job list keeps working, and rows stored before the bound are clamped."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import pytest
from alembic import command

from core.settings import sqlalchemy_url
from migrations import alembic_config, upgrade_head
from tests.helpers.jobs import text_job
from tests.helpers.servers import scratch_database
from tests.helpers.stack import Stack

pytestmark = pytest.mark.stack

FAR = "9999-12-31T23:59:59-15:59"  # year 10000 in UTC


def test_a_far_future_expiry_is_422_and_nothing_is_stored(client: httpx.Client) -> None:
    for expires_at in (FAR, (datetime.now(UTC) + timedelta(days=31)).isoformat()):
        response = client.post("/v1/jobs", json=text_job("hi", variant="echo") | {"expires_at": expires_at})
        assert response.status_code == 422, response.text
        assert "expires_at" in response.json()["error"]["message"]
    listed = client.get("/v1/jobs")  # a new tenant's: nothing was stored
    assert listed.status_code == 200 and listed.json()["data"] == [], listed.text
    soon = (datetime.now(UTC) + timedelta(days=29)).isoformat()
    accepted = client.post("/v1/jobs", json=text_job("hi", variant="echo") | {"expires_at": soon})
    assert accepted.status_code == 202, accepted.text
    assert client.get("/v1/jobs").status_code == 200


def test_the_migration_clamps_stored_far_future_expiries(stack: Stack) -> None:
    with scratch_database(stack.database_url) as url:
        command.upgrade(alembic_config(sqlalchemy_url(url)), "0012")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("INSERT INTO users (id, name, is_admin) VALUES ('u1', 'u1', false)")
            conn.execute(
                "INSERT INTO jobs (id, user_id, variant, task, status, priority, input, params, metadata,"
                " attempts, expires_at) VALUES ('j1', 'u1', 'echo', 'text', 'queued', 5, '{}', '{}', '{}',"
                " 0, %s::timestamptz)",
                (FAR,),
            )
            with pytest.raises(psycopg.DataError):  # what broke the tenant's job list
                conn.execute("SELECT expires_at FROM jobs").fetchall()
        upgrade_head(sqlalchemy_url(url))
        with psycopg.connect(url) as conn:
            [(expires_at, created_at)] = conn.execute("SELECT expires_at, created_at FROM jobs").fetchall()
        assert expires_at - created_at == timedelta(days=30)
