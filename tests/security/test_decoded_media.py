"""Finding 9: an image's quota counts its compressed bytes, but the worker decodes it. A 25 MP
upload decoded at full size is 100 MB of pixels in the worker (Pillow keeps 4 bytes a pixel),
8 per job and many jobs in hand. Images are decoded no larger than `media_decode_max_side`,
a worker holds at most `worker_media_mb` of decoded media for its jobs together, and every job's
decoded bytes are counted in its metrics."""

from __future__ import annotations

import io
import threading

import httpx
import pytest
from PIL import Image

from tests.helpers.jobs import image_job
from tests.helpers.media import b64, jpeg
from tests.helpers.stack import wait_job
from workers.shell.media_decoding import (
    MAX_SIDE,
    PIXEL_BYTES,
    MediaBudget,
    decoded_bytes,
    load_media,
    media_parts,
)

WIDE, TALL = 6000, 4000  # 24 MP: within the API's 25 MP cap


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (20, 120, 220)).save(out, "PNG")
    return out.getvalue()


def _job(count: int, data: bytes) -> tuple[list[dict[str, object]], dict[str, bytes]]:
    content: list[dict[str, object]] = [{"type": "image", "file_id": f"file_{n}"} for n in range(count)]
    return [{"role": "user", "content": [*content, {"type": "text", "text": "Describe."}]}], {
        f"file_{n}": data for n in range(count)
    }


@pytest.mark.unit
@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_a_job_of_eight_large_images_decodes_within_its_bound(kind: str) -> None:
    data = _png(WIDE, TALL) if kind == "png" else jpeg(WIDE, TALL)
    messages, contents = _job(8, data)
    foreseen = decoded_bytes(media_parts(messages, contents))
    loaded = load_media(messages, contents)
    images = [p["image"] for p in loaded.messages[0]["content"] if p.get("type") == "image"]
    assert len(images) == 8 and all(max(i.size) == MAX_SIDE for i in images)
    assert images[0].size == (MAX_SIDE, round(TALL * MAX_SIDE / WIDE))  # its shape kept
    kept = 8 * MAX_SIDE * round(TALL * MAX_SIDE / WIDE) * PIXEL_BYTES
    assert loaded.bytes == kept  # counted: about 73 MB, not 768 MB at full size
    # Foreseen from the headers before a byte is decoded: the kept pixels, and one full frame
    # being decoded (read, then made RGB).
    assert foreseen == kept + 2 * WIDE * TALL * PIXEL_BYTES


@pytest.mark.unit
def test_a_small_image_is_decoded_as_it_is() -> None:
    messages, contents = _job(1, _png(64, 48))
    loaded = load_media(messages, contents)
    assert loaded.messages[0]["content"][0]["image"].size == (64, 48)
    assert loaded.bytes == 64 * 48 * PIXEL_BYTES


@pytest.mark.unit
def test_a_worker_holds_no_more_decoded_media_than_its_budget() -> None:
    budget = MediaBudget(100)
    entered = threading.Event()

    def second_job() -> None:
        with budget.hold(60):
            entered.set()

    with budget.hold(70):
        waiting = threading.Thread(target=second_job)
        waiting.start()
        assert not entered.wait(0.3) and budget.used == 70  # 70 + 60 does not fit: it waits
    assert entered.wait(5)
    waiting.join(timeout=5)
    assert budget.used == 0
    with budget.hold(500):  # more than the whole: cut to it, so that a job alone always runs
        assert budget.used == 100


@pytest.mark.stack
def test_a_jobs_decoded_media_is_counted_in_its_metrics(client: httpx.Client) -> None:
    response = client.post("/v1/jobs", json=image_job({"data": b64(jpeg(2400, 1600))}))
    assert response.status_code == 202, response.text
    job = wait_job(client, response.json()["id"])
    assert job["status"] == "succeeded", job
    assert job["metrics"]["media_bytes"] == MAX_SIDE * round(1600 * MAX_SIDE / 2400) * PIXEL_BYTES
