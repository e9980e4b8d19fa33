"""Admin: the role, users and quotas from the CLI and the API, keys revoked at once."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.helpers.http import assert_envelope
from tests.helpers.stack import Stack

pytestmark = pytest.mark.stack


def test_non_admin_gets_403_on_admin_routes(client: httpx.Client) -> None:
    assert_envelope(client.get("/v1/admin/users"), 403, "FORBIDDEN")
    assert_envelope(client.post("/v1/admin/users", json={"name": "sneaky"}), 403, "FORBIDDEN")
    assert_envelope(client.post("/v1/admin/keys/gq_abcdefg/revoke"), 403, "FORBIDDEN")


def test_admin_creates_users_sets_quotas_and_revokes_keys(stack: Stack) -> None:
    admin_key = stack.run_cli("users", "create", "boss-admin", "--admin").strip().splitlines()[-1]
    with stack.client(admin_key) as admin:
        created = admin.post("/v1/admin/users", json={"name": "carol", "quota": {"requests_per_minute": 5}})
        assert created.status_code == 201, created.text
        key = created.json()["key"]
        assert_envelope(admin.post("/v1/admin/users", json={"name": "carol"}), 409, "CONFLICT")
        users = {u["name"]: u for u in admin.get("/v1/admin/users").json()}
        assert users["carol"]["quota"]["requests_per_minute"] == 5
        assert users["carol"]["active_keys"] == [created.json()["prefix"]]
        patched = admin.patch(
            "/v1/admin/users/carol/quota", json={"tokens_per_day": 1234, "allowed_variants": ["echo"]}
        )
        assert patched.json()["quota"] | {} == {
            "requests_per_minute": 5, "tokens_per_day": 1234, "max_concurrent_jobs": 64,
            "max_input_bytes": 20 * 1024 * 1024, "allowed_variants": ["echo"],
            "max_storage_bytes": 2 * 1024**3, "max_files": 1000, "max_priority": None,
            "moderation_policy": None,
        }  # fmt: skip
        with stack.client(key) as carol:
            assert carol.get("/v1/jobs").status_code == 200
            assert admin.post(f"/v1/admin/keys/{key[:10]}/revoke").json() == {"revoked": 1}
            assert_envelope(carol.get("/v1/jobs"), 401, "UNAUTHORIZED")  # at once
        assert_envelope(admin.post("/v1/admin/users/nobody/keys"), 404, "NOT_FOUND")


def test_cli_users_and_keys(stack: Stack) -> None:
    out = stack.run_cli("users", "create", "dave", "--requests-per-minute", "10", "--tokens-per-day", "5000",
                        "--max-concurrent-jobs", "2")  # fmt: skip
    key = out.strip().splitlines()[-1]
    listing = stack.run_cli("users", "list")
    line = next(x for x in listing.splitlines() if x.startswith("dave\t"))
    assert "rpm=10" in line and "tokens/day=5000" in line and "concurrent=2" in line and key[:10] in line
    stack.run_cli(
        "users", "set-quota", "dave", "--requests-per-minute", "20", "--allowed-variants", "echo,gemma-3-270m"
    )
    quota = (
        "SELECT requests_per_minute, allowed_variants FROM quotas"
        " JOIN users ON users.id = user_id WHERE name = %s"
    )
    assert stack.sql(quota, "dave") == [(20, ["echo", "gemma-3-270m"])]
    stack.run_cli("users", "set-quota", "dave", "--allowed-variants", "all")
    assert stack.sql(
        "SELECT allowed_variants FROM quotas JOIN users ON users.id = user_id WHERE name = 'dave'"
    ) == [(None,)]
    second = stack.run_cli("keys", "create", "dave").strip().splitlines()[-1]
    with stack.client(key) as c:
        assert c.get("/v1/jobs").status_code == 200
    stack.run_cli("keys", "revoke", key[:10])
    with stack.client(key) as c:
        assert_envelope(c.get("/v1/jobs"), 401, "UNAUTHORIZED")
    with stack.client(second) as c:
        assert c.get("/v1/jobs").status_code == 200


def test_a_quota_change_applies_at_once_to_a_key_in_use(stack: Stack) -> None:
    """API processes keep keys in memory; a quota change (CLI or API) still holds from the next request."""
    admin_key = stack.run_cli("users", "create", f"admin-{uuid.uuid4().hex[:6]}", "--admin").strip()
    echo = {"variant": "echo", "input": {"prompt": "cached"}}
    with stack.client(stack.new_key("cached")) as caller, stack.client(admin_key.splitlines()[-1]) as admin:
        assert caller.post("/v1/jobs", json=echo).status_code == 202  # the key is in memory now
        name = caller.get("/v1/usage").json()["user"]
        stack.run_cli("users", "set-quota", name, "--allowed-variants", "gemma-3-270m")
        assert_envelope(caller.post("/v1/jobs", json=echo), 403, "FORBIDDEN")
        admin.patch(f"/v1/admin/users/{name}/quota", json={"allowed_variants": None}).raise_for_status()
        assert caller.post("/v1/jobs", json=echo).status_code == 202
