"""What one tenant can do to the others' view of the deployment: turn off every process's key
cache, crowd the webhook rounds, or see text from a lost attempt mixed into a stream."""

from __future__ import annotations

import httpx
import pytest
import redis
from sqlalchemy import text

from core.keys import key_epoch_key
from db.repo import webhooks as webhooks_repo
from db.session import sync_sessionmaker
from tests.helpers.http import sse
from tests.helpers.jobs import ESSAY
from tests.helpers.stack import Stack

pytestmark = pytest.mark.stack

DUE = (
    "INSERT INTO webhook_deliveries (id, user_id, event, url, status, attempts, history, next_attempt_at)"
    " VALUES (:id, :user_id, 'job.succeeded', 'http://192.0.2.1/', 'pending', 0, '[]',"
    " now() - interval '1 hour')"
)


def user_of(stack: Stack, key: str) -> str:
    return str(stack.sql("SELECT user_id FROM api_keys WHERE prefix = %s", key[:10])[0][0])


def test_a_user_cannot_renew_the_key_epoch(stack: Stack, client: httpx.Client) -> None:
    epochs = redis.Redis.from_url(stack.redis_url)
    key = key_epoch_key(stack.settings())
    client.get("/v1/usage")  # the epoch exists
    before = epochs.get(key)
    for _ in range(5):
        assert client.put("/v1/webhooks/settings", json={"default_url": None}).status_code == 200
    assert epochs.get(key) == before


def test_webhook_rounds_take_users_in_turn(stack: Stack) -> None:
    """A user with a backlog of due deliveries cannot fill a round: each user's share is capped.
    The deliveries are written in the round's own transaction, never committed, so the stack's
    running dispatcher cannot take them first."""
    greedy, modest = (user_of(stack, stack.new_key(name)) for name in ("hook-greedy", "hook-modest"))
    session = sync_sessionmaker(stack.settings().db_url)()
    try:
        for user_id, n in [(greedy, n) for n in range(40)] + [(modest, n) for n in range(2)]:
            session.execute(text(DUE), {"id": f"msg_turns_{user_id[-12:]}_{n}", "user_id": user_id})
        claimed = webhooks_repo.claim_due(session=session, limit=8, per_user=4, lease_s=3600)
        taken = [d.user_id for d in claimed if d.id.startswith("msg_turns_")]
    finally:
        session.rollback()
        session.close()
    assert taken.count(modest) == 2 and taken.count(greedy) <= 4, taken


def test_running_and_deltas_carry_their_attempt(client: httpx.Client) -> None:
    job_id = client.post("/v1/jobs", json=ESSAY).json()["id"]
    events = list(sse(client, job_id))
    running = [e["data"] for e in events if e["event"] == "status" and e["data"]["status"] == "running"]
    deltas = [e["data"] for e in events if e["event"] == "delta"]
    assert running == [{"status": "running", "attempt": 1}]
    assert deltas and all(d["attempt"] == 1 for d in deltas)
