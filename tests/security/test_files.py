"""Files under a storage quota (bytes and count) and retention: an upload past either is a 429,
an expired file is gone at once for its owner and deleted, parts and all, by the reconciler."""

from __future__ import annotations

import time

import openai
import pytest

from tests.helpers.batches import jsonl, line, oai_for
from tests.helpers.stack import Stack

pytestmark = pytest.mark.stack


def upload(oai: openai.OpenAI, lines: int, **more: object) -> openai.types.FileObject:
    return oai.files.create(file=("f.jsonl", jsonl([line(i) for i in range(lines)])), purpose="batch", **more)  # type: ignore[arg-type]


def test_uploads_past_the_storage_quota_are_429(stack: Stack) -> None:
    one = len(jsonl([line(i) for i in range(10)]))
    oai = oai_for(stack, stack.new_key("storage", max_storage_bytes=int(one * 2.5), max_files=3))
    upload(oai, 10)
    upload(oai, 10)
    with pytest.raises(openai.RateLimitError) as refused:
        upload(oai, 10)  # a third would hold three times `one` bytes
    assert refused.value.response.json()["error"]["code"] == "QUOTA_EXCEEDED"
    assert refused.value.response.json()["error"]["details"]["limit"] == "max_storage_bytes"
    upload(oai, 1)  # a small one still fits: 3 files
    with pytest.raises(openai.RateLimitError) as counted:
        upload(oai, 1)
    assert counted.value.response.json()["error"]["details"]["limit"] == "max_files"
    usage = oai.get("/usage", cast_to=object)
    assert usage["storage"]["files"] == 3 and usage["storage"]["limit_files"] == 3  # type: ignore[index]


def test_an_expired_file_is_404_and_its_rows_and_parts_are_deleted(stack: Stack) -> None:
    oai = oai_for(stack, stack.new_key("retention"))
    kept = upload(oai, 3, expires_after={"anchor": "created_at", "seconds": 3600})
    assert kept.expires_at is not None and abs(kept.expires_at - kept.created_at - 3600) <= 2
    default = upload(oai, 3)
    assert default.expires_at is not None  # the deployment's default retention
    assert stack.sql("SELECT count(*) FROM file_parts WHERE file_id = %s", kept.id)[0][0] == 1
    stack.sql(
        "UPDATE files SET expires_at = now() - interval '1 second' WHERE id = %s", kept.id
    )  # an hour on
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve(kept.id)
    with pytest.raises(openai.NotFoundError):
        oai.files.content(kept.id)
    assert kept.id not in {f.id for f in oai.files.list()}
    deadline = time.monotonic() + 30
    while stack.sql("SELECT count(*) FROM files WHERE id = %s", kept.id)[0][0]:
        assert time.monotonic() < deadline, "the reconciler did not delete the expired file"
        time.sleep(0.5)
    assert stack.sql("SELECT count(*) FROM file_parts WHERE file_id = %s", kept.id)[0][0] == 0
    assert oai.files.retrieve(default.id).id == default.id
