"""LoRA adapters through the real API: uploaded, listed, read and deleted by their owner only (404
for anyone else, unless an admin publishes one), counted in the owner's storage quota; and every
hostile upload refused with a 4xx in the one envelope, leaving no row and no file behind."""

from __future__ import annotations

import asyncio
import json
import os
import tarfile
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from db.repo import adapters as adapters_repo
from db.session import async_engine, make_async_sessionmaker, sync_engine, sync_sessionmaker
from gemmaq.admin import create_user_with_key
from tests.helpers.adapter_archives import (
    SHAPES,
    adapter_config,
    adapter_files,
    lora_tensors,
    safetensors,
    tar_archive,
    zip_archive,
)
from tests.helpers.http import assert_envelope
from tests.helpers.stack import Stack

pytestmark = pytest.mark.stack

BASE = "gemma-3-270m"
MiB = 1024 * 1024


def upload(
    client: httpx.Client, archive: bytes, name: str, base: str = BASE, filename: str = "adapter.tar.gz"
) -> httpx.Response:
    return client.post("/v1/adapters", files={"file": (filename, archive)}, data={"name": name, "base": base})


def fresh(prefix: str = "lora") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def rows_named(stack: Stack, name: str) -> int:
    count = stack.sql("SELECT count(*) FROM adapters WHERE name = %s", name)[0][0]
    assert isinstance(count, int)
    return count


@pytest.fixture
def other(stack: Stack) -> Iterator[httpx.Client]:
    with stack.client(stack.new_key("tenant-b")) as c:
        yield c


@pytest.fixture
def admin(stack: Stack) -> Iterator[httpx.Client]:
    key = asyncio.run(create_user_with_key(stack.settings(), fresh("admin"), admin=True))
    with stack.client(key) as c:
        yield c


def test_upload_list_get_and_delete(stack: Stack, client: httpx.Client, other: httpx.Client) -> None:
    files = adapter_files()
    name = fresh()
    created = upload(client, tar_archive(files), name)
    assert created.status_code == 201, created.text
    adapter = created.json()
    config = json.loads(files["adapter_config.json"])
    assert adapter | {"id": "", "created_at": 0} == {
        "id": "", "object": "adapter", "name": name, "base": BASE, "rank": 8, "alpha": 16.0,
        "target_modules": ["q_proj", "v_proj"], "public": False, "owned": True, "created_at": 0,
        "bytes": len(files["adapter_model.safetensors"]) + len(json.dumps(config).encode()),
    }  # fmt: skip
    assert adapter["id"].startswith("adapter_")
    weights, sha256, stored = stack.sql(
        "SELECT weights, sha256, config FROM adapters WHERE id = %s", adapter["id"]
    )[0]
    assert isinstance(weights, bytes) and weights == files["adapter_model.safetensors"] and stored == config
    assert len(str(sha256)) == 64
    assert client.get(f"/v1/adapters/{adapter['id']}").json() == adapter
    assert adapter in client.get("/v1/adapters").json()["data"]
    storage = client.get("/v1/usage").json()["storage"]
    assert storage["files"] == 1 and storage["used_bytes"] == adapter["bytes"]

    # Another tenant: 404 on everything, and not in their list.
    assert_envelope(other.get(f"/v1/adapters/{adapter['id']}"), 404, "NOT_FOUND")
    assert_envelope(other.delete(f"/v1/adapters/{adapter['id']}"), 404, "NOT_FOUND")
    assert adapter["id"] not in [a["id"] for a in other.get("/v1/adapters").json()["data"]]
    assert_envelope(other.post(f"/v1/adapters/{adapter['id']}/publish"), 403, "FORBIDDEN")  # admins only
    # The same name again: 409 (a zip this time); another tenant may take the name.
    assert_envelope(upload(client, zip_archive(files), name, filename="a.zip"), 409, "CONFLICT")
    assert upload(other, zip_archive(files), name, filename="a.zip").status_code == 201

    deleted = client.delete(f"/v1/adapters/{adapter['id']}")
    assert deleted.status_code == 200 and deleted.json() == {
        "id": adapter["id"],
        "object": "adapter",
        "deleted": True,
    }
    assert_envelope(client.get(f"/v1/adapters/{adapter['id']}"), 404, "NOT_FOUND")
    assert_envelope(client.delete(f"/v1/adapters/{adapter['id']}"), 404, "NOT_FOUND")
    assert rows_named(stack, name) == 1  # the other tenant's
    assert upload(client, tar_archive(files), name).status_code == 201  # the name is free again


def test_an_admin_publishes_an_adapter_to_every_tenant(
    stack: Stack, client: httpx.Client, other: httpx.Client, admin: httpx.Client
) -> None:
    name = fresh("shared")
    adapter = upload(client, zip_archive(adapter_files(seed=1)), name, filename="a.zip").json()
    published = admin.post(f"/v1/adapters/{adapter['id']}/publish")
    assert published.status_code == 200, published.text
    assert published.json()["public"] is True and published.json()["owned"] is False
    seen = other.get(f"/v1/adapters/{adapter['id']}").json()
    assert seen["public"] and not seen["owned"]
    listed = other.get("/v1/adapters").json()["data"]
    assert adapter["id"] in [a["id"] for a in listed]
    assert_envelope(other.delete(f"/v1/adapters/{adapter['id']}"), 404, "NOT_FOUND")  # not theirs
    # The other tenant's own adapter of that name comes first in their list.
    mine = upload(other, tar_archive(adapter_files()), name).json()
    listed = other.get("/v1/adapters").json()["data"]
    assert [a["id"] for a in listed if a["name"] == name] == [mine["id"], adapter["id"]]
    assert [a["owned"] for a in listed] == sorted((a["owned"] for a in listed), reverse=True)
    assert_envelope(admin.post("/v1/adapters/adapter_doesnotexist/publish"), 404, "NOT_FOUND")
    assert admin.post(f"/v1/adapters/{adapter['id']}/unpublish").json()["public"] is False
    assert_envelope(other.get(f"/v1/adapters/{adapter['id']}"), 404, "NOT_FOUND")


def _resolved(stack: Stack, user_id: str, base: str, name: str) -> str | None:
    async def run() -> str | None:
        engine = async_engine(stack.settings().db_url)
        try:
            async with make_async_sessionmaker(engine)() as session:
                found = await adapters_repo.resolve(session=session, user_id=user_id, base=base, name=name)
                return None if found is None else found.id
        finally:
            await engine.dispose()

    return asyncio.run(run())


def test_what_jobs_and_workers_read(stack: Stack, client: httpx.Client, admin: httpx.Client) -> None:
    """`resolve` (the API, at a job's admission) and `digest` / `read_adapter` (workers)."""
    owner_key, other_key = stack.new_key("owner"), stack.new_key("user")
    users = {}
    for key in (owner_key, other_key):
        with stack.client(key) as c:
            users[key] = c.get("/v1/usage").json()["user"]
    owner_id, other_id = (
        str(stack.sql("SELECT id FROM users WHERE name = %s", users[k])[0][0]) for k in (owner_key, other_key)
    )
    files = adapter_files()
    name = fresh("jobs")
    with stack.client(owner_key) as owner:
        adapter = upload(owner, tar_archive(files), name).json()
    assert _resolved(stack, owner_id, BASE, name) == adapter["id"]
    assert _resolved(stack, owner_id, BASE, adapter["id"]) == adapter["id"]  # by id too
    assert _resolved(stack, owner_id, "gemma-3-270m-nf4", name) is None  # an adapter of another variant
    assert _resolved(stack, other_id, BASE, name) is None  # private
    with sync_sessionmaker(stack.settings().db_url)() as session:
        assert adapters_repo.digest(session=session, adapter_id=adapter["id"], user_id=other_id) is None
        found = adapters_repo.digest(session=session, adapter_id=adapter["id"], user_id=owner_id)
        assert found is not None and found[1] == json.loads(files["adapter_config.json"])
        read = adapters_repo.read_adapter(session=session, adapter_id=adapter["id"])
        assert read == (json.loads(files["adapter_config.json"]), files["adapter_model.safetensors"])
    admin.post(f"/v1/adapters/{adapter['id']}/publish").raise_for_status()
    assert _resolved(stack, other_id, BASE, name) == adapter["id"]
    with stack.client(other_key) as other:
        theirs = upload(other, zip_archive(files), name, filename="a.zip").json()
    assert _resolved(stack, other_id, BASE, name) == theirs["id"]  # their own first
    assert _resolved(stack, other_id, BASE, adapter["id"]) == adapter["id"]
    with stack.client(owner_key) as owner:
        owner.delete(f"/v1/adapters/{adapter['id']}").raise_for_status()
    with sync_sessionmaker(stack.settings().db_url)() as session:
        assert adapters_repo.read_adapter(session=session, adapter_id=adapter["id"]) is None
    sync_engine(stack.settings().db_url).dispose()


def test_adapters_count_in_the_storage_quota(stack: Stack) -> None:
    archive = tar_archive(adapter_files())
    with stack.client(stack.new_key("small", max_storage_bytes=MiB)) as small:
        error = assert_envelope(upload(small, archive, fresh()), 429, "QUOTA_EXCEEDED")
        assert error["details"]["limit"] == "max_storage_bytes"
    with stack.client(stack.new_key("one-file", max_files=1)) as one:
        assert upload(one, archive, fresh()).status_code == 201
        error = assert_envelope(upload(one, archive, fresh()), 429, "QUOTA_EXCEEDED")
        assert error["details"]["limit"] == "max_files"
        media = one.post("/v1/files", files={"file": ("f.jsonl", b'{"a": 1}\n')}, data={"purpose": "batch"})
        assert_envelope(media, 429, "QUOTA_EXCEEDED")  # the adapter is the one file the quota allows


def _entries(*folders: Path) -> set[str]:
    return {str(p) for folder in folders for p in folder.iterdir()}


def _hostile() -> list[tuple[str, bytes, int, str, str]]:
    """(case, archive, status, code, words in the message) for every upload that must be refused."""
    files = adapter_files()
    pickles = {"adapter_config.json": files["adapter_config.json"], "adapter_model.bin": b"\x80\x04pickle"}
    wider = {name: (1152 if i == 640 else i, 1152 if o == 640 else o) for name, (i, o) in SHAPES.items()}
    tensors = lora_tensors()
    wrong = "base_model.model.model.layers.5.self_attn.q_proj.lora_B.weight"
    tensors[wrong] = ("F32", [512, 16], tensors[wrong][2])
    bad, odd = (422, "VALIDATION_ERROR"), (415, "UNSUPPORTED_MEDIA")
    cases: list[tuple[str, bytes, tuple[int, str], str]] = [
        ("dotdot", tar_archive(files | {"../../pwned.txt": b"x"}), bad, "'..'"),
        ("dotdot-zip", zip_archive(files | {"../pwned.txt": b"x"}, folder=""), bad, "'..'"),
        ("absolute", tar_archive(files | {"/tmp/pwned.txt": b"x"}, folder=""), bad, "absolute"),
        ("absolute-zip", zip_archive(files | {"/tmp/pwned.txt": b"x"}, folder=""), bad, "absolute"),
        ("symlink", tar_archive(files, links={"README.md": (tarfile.SYMTYPE, "/etc/passwd")}), bad, "link"),
        ("hardlink", tar_archive(files, links={"README.md": (tarfile.LNKTYPE, "/etc/passwd")}), bad, "link"),
        ("symlink-zip", zip_archive(files, symlinks={"README.md": "/etc/passwd"}), bad, "link"),
        ("pickle", tar_archive(pickles), bad, "only safetensors"),
        ("pickle-zip", zip_archive(pickles), bad, "only safetensors"),
        (
            "other-base",
            tar_archive(adapter_files(weights=safetensors(lora_tensors(shapes=wider)))),
            bad,
            "[8, 1152]",
        ),
        ("rank", tar_archive(adapter_files(rank=128)), bad, "from 1 to 64"),
        ("shape", tar_archive(adapter_files(weights=safetensors(tensors))), bad, "needs [1024, 8]"),
        ("dora", tar_archive(adapter_files(config=adapter_config(use_dora=True))), bad, "DoRA"),
        ("not-an-archive", b"I am not an archive" * 100, odd, "not a tar"),
        ("empty", b"", odd, "not a tar"),
        ("truncated", tar_archive(files)[:5000], bad, "truncated"),
    ]
    return [(case, archive, status, code, words) for case, archive, (status, code), words in cases]


HOSTILE = _hostile()


@pytest.mark.parametrize(("case", "archive", "status", "code", "words"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_uploads_are_refused_and_leave_nothing(
    stack: Stack,
    client: httpx.Client,
    tmp_path: Path,
    case: str,
    archive: bytes,
    status: int,
    code: str,
    words: str,
) -> None:
    watched = [tmp_path, Path.cwd(), Path(tempfile.gettempdir())]
    before = _entries(*watched)
    name = fresh(case)
    error = assert_envelope(upload(client, archive, name), status, code)
    assert words in error["message"], error
    assert rows_named(stack, name) == 0
    assert name not in [a["name"] for a in client.get("/v1/adapters").json()["data"]]
    new = {
        p
        for p in _entries(*watched) - before
        if "pwned" in p or "adapter" in p or p.startswith(str(tmp_path))
    }
    assert not new, new
    for folder in {Path.cwd(), Path.cwd().parent, Path(tempfile.gettempdir()), Path("/tmp")}:
        assert not (folder / "pwned.txt").exists()


def test_refusals_before_the_archive_is_read(client: httpx.Client) -> None:
    archive = tar_archive(adapter_files())
    error = assert_envelope(upload(client, archive, fresh(), base="no-such-variant"), 422, "UNKNOWN_VARIANT")
    assert BASE in error["details"]["variants"]
    error = assert_envelope(upload(client, archive, fresh(), base="echo"), 422, "VALIDATION_ERROR")
    assert "takes no LoRA adapters" in error["message"] and BASE in error["details"]["variants"]
    for bad in ("Upper", "-lead", "a/b", "x" * 65, "", "a b"):
        assert_envelope(upload(client, archive, bad), 422, "VALIDATION_ERROR")
    assert_envelope(
        client.post("/v1/adapters", data={"name": fresh(), "base": BASE}), 422, "VALIDATION_ERROR"
    )


def test_an_archive_past_the_cap_is_413(stack: Stack, client: httpx.Client) -> None:
    huge = os.urandom(1024) * (64 * 1024 + 1)  # 64 MiB and 1 KiB: past adapters_max_bytes
    name = fresh("huge")
    error = assert_envelope(upload(client, huge, name), 413, "PAYLOAD_TOO_LARGE")
    assert error["details"]["limit"] == 64 * MiB
    assert rows_named(stack, name) == 0


def test_another_model_config_json_is_not_trusted(client: httpx.Client) -> None:
    """base_model_name_or_path is informative: the shapes decide, against the base named here."""
    config = adapter_config(base_model_name_or_path="google/gemma-3-27b-it")
    response = upload(client, tar_archive(adapter_files(config=config)), fresh(), base="gemma-3-270m-nf4")
    assert response.status_code == 201, response.text
    assert response.json()["base"] == "gemma-3-270m-nf4"
