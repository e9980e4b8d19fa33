"""Media is checked at the API: sniffed formats, caps before decoding, owner-only files."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.helpers.http import assert_envelope
from tests.helpers.jobs import VISION, audio_job, image_job, upload
from tests.helpers.media import b64, jpeg, png, png_header_only, tone_wav
from tests.helpers.stack import Stack

pytestmark = pytest.mark.stack


def test_upload_sniffs_the_bytes_not_the_name(client: httpx.Client) -> None:
    response = upload(client, png(), "photo.wav")
    assert response.status_code == 201, response.text
    file = response.json()
    assert file["object"] == "file" and file["purpose"] == "media" and file["filename"] == "photo.wav"
    assert file["content_type"] == "image/png"
    assert file["media"] | {} == {"kind": "image", "format": "PNG", "content_type": "image/png",
                                  "bytes": len(png()), "width": 64, "height": 48}  # fmt: skip
    assert client.get(f"/v1/files/{file['id']}/content").content == png()
    audio = upload(client, tone_wav(1.0), "clip.png").json()
    assert audio["content_type"] == "audio/wav" and audio["media"]["seconds"] == 1.0


def test_text_renamed_wav_is_415(client: httpx.Client) -> None:
    assert_envelope(upload(client, b"hello, I am not audio\n" * 50, "speech.wav"), 415, "UNSUPPORTED_MEDIA")
    assert_envelope(client.post("/v1/jobs", json=audio_job({"data": b64(b"not audio at all")})), 415,
                    "UNSUPPORTED_MEDIA")  # fmt: skip


def test_bomb_header_is_413_before_decoding(client: httpx.Client) -> None:
    bomb = png_header_only(60_000, 60_000)
    error = assert_envelope(
        client.post("/v1/jobs", json=image_job({"data": b64(bomb)})), 413, "PAYLOAD_TOO_LARGE"
    )
    assert error["details"]["width"] == 60_000 and "pixels" in error["message"]
    assert_envelope(upload(client, bomb, "bomb.png"), 413, "PAYLOAD_TOO_LARGE")


def test_truncated_jpeg_is_422(client: httpx.Client) -> None:
    broken = jpeg()[: len(jpeg()) // 2]
    error = assert_envelope(
        client.post("/v1/jobs", json=image_job({"data": b64(broken)})), 422, "VALIDATION_ERROR"
    )
    assert "truncated or corrupt" in error["message"]


def test_audio_over_the_duration_cap_is_413(client: httpx.Client) -> None:
    long_clip = tone_wav(31.0, rate=8_000)
    error = assert_envelope(client.post("/v1/jobs", json=audio_job({"data": b64(long_clip)})), 413,
                            "PAYLOAD_TOO_LARGE")  # fmt: skip
    assert error["details"]["limit_seconds"] == 30


def test_image_part_to_a_text_only_variant_is_422(client: httpx.Client) -> None:
    for body in (image_job({"data": b64(png())}, variant="gemma-3-270m"),
                 image_job({"data": b64(png())}, variant="gemma-3-270m", task="text")):  # fmt: skip
        error = assert_envelope(client.post("/v1/jobs", json=body), 422, "VALIDATION_ERROR")
        assert "gemma-3-270m" in error["message"]
    error = assert_envelope(client.post("/v1/jobs", json=image_job({"data": b64(png())}, task="text")), 422,
                            "VALIDATION_ERROR")  # fmt: skip
    assert "task 'image'" in error["message"]
    to_text_model = image_job({"data": b64(png())}, variant="gemma-3-270m")
    served = assert_envelope(client.post("/v1/jobs", json=to_text_model), 422, "VALIDATION_ERROR")
    assert VISION in served["details"]["variants"]  # names the variants that do serve images


@pytest.mark.parametrize(
    ("part", "status", "code"),
    [
        ({"data": "%%% not base64"}, 422, "VALIDATION_ERROR"),
        ({"data": b64(png()), "file_id": "file_x"}, 422, "VALIDATION_ERROR"),
        ({}, 422, "VALIDATION_ERROR"),
        ({"file_id": "file_doesnotexist"}, 404, "NOT_FOUND"),
        ({"data": "data:image/png;base64," + b64(b"GIF89a-not-really")}, 415, "UNSUPPORTED_MEDIA"),
    ],
)
def test_bad_media_parts(client: httpx.Client, part: dict[str, Any], status: int, code: str) -> None:
    assert_envelope(client.post("/v1/jobs", json=image_job(part)), status, code)


def test_too_many_parts_is_422(client: httpx.Client) -> None:
    parts = [{"type": "image", "data": b64(png())} for _ in range(9)]
    body = {"variant": VISION, "task": "image", "input": {"messages": [{"role": "user", "content": parts}]}}
    error = assert_envelope(client.post("/v1/jobs", json=body), 422, "VALIDATION_ERROR")
    assert "media parts" in error["message"]


def test_a_file_of_the_wrong_kind_is_422(client: httpx.Client) -> None:
    audio = upload(client, tone_wav(1.0), "a.wav").json()
    error = assert_envelope(client.post("/v1/jobs", json=image_job({"file_id": audio["id"]})), 422,
                            "VALIDATION_ERROR")  # fmt: skip
    assert "not image media" in error["message"]


def test_user_b_cannot_touch_user_a_files(stack: Stack, client: httpx.Client) -> None:
    file = upload(client, png(), "mine.png").json()
    with stack.client(stack.new_key("b")) as b:
        assert_envelope(b.get(f"/v1/files/{file['id']}"), 404, "NOT_FOUND")
        assert_envelope(b.get(f"/v1/files/{file['id']}/content"), 404, "NOT_FOUND")
        assert_envelope(b.delete(f"/v1/files/{file['id']}"), 404, "NOT_FOUND")
        assert file["id"] not in [f["id"] for f in b.get("/v1/files").json()["data"]]
        assert_envelope(b.post("/v1/jobs", json=image_job({"file_id": file["id"]})), 404, "NOT_FOUND")
    assert client.get(f"/v1/files/{file['id']}").status_code == 200


def test_list_and_delete_files(stack: Stack) -> None:
    with stack.client(stack.new_key()) as c:
        ids = [upload(c, png(color=(i, i, i)), f"{i}.png").json()["id"] for i in range(3)]
        batch = upload(c, b'{"custom_id": "1"}\n{"custom_id": "2"}\n', "in.jsonl", purpose="batch").json()
        assert batch["content_type"] == "application/jsonl" and batch["media"] == {"lines": 2, "parts": 1}
        page = c.get("/v1/files", params={"purpose": "media", "limit": 2}).json()
        assert [f["id"] for f in page["data"]] == [ids[2], ids[1]] and page["has_more"]
        rest = c.get("/v1/files", params={"purpose": "media", "after": ids[1]}).json()
        assert [f["id"] for f in rest["data"]] == [ids[0]] and not rest["has_more"]
        assert c.delete(f"/v1/files/{ids[0]}").json() == {"id": ids[0], "object": "file", "deleted": True}
        assert_envelope(c.get(f"/v1/files/{ids[0]}"), 404, "NOT_FOUND")
        assert_envelope(upload(c, b"not json\n", "x.jsonl", purpose="batch"), 422, "VALIDATION_ERROR")
        assert_envelope(upload(c, b"", "empty.png"), 422, "VALIDATION_ERROR")
        assert_envelope(c.post("/v1/files", files={"file": ("a.png", png())}, data={"purpose": "x"}), 422,
                        "VALIDATION_ERROR")  # fmt: skip


def test_oversized_bodies_are_413_before_parsing(stack: Stack, key: str) -> None:
    huge = b"x" * (65 * 1024 * 1024)
    with stack.client(key) as c:  # (without a key: 401 before the body is read, tests/security)
        response = c.post("/v1/jobs", content=huge, headers={"Content-Type": "application/json"})
        assert_envelope(response, 413, "PAYLOAD_TOO_LARGE")


def test_audio_shape_and_whisper_window_caps(client: httpx.Client) -> None:
    import io

    import numpy as np
    import soundfile

    out = io.BytesIO()
    soundfile.write(out, np.zeros((96_000 * 2, 2), dtype=np.float32), 96_000, format="FLAC")
    error = assert_envelope(client.post("/v1/jobs", json=audio_job({"data": b64(out.getvalue())})), 422,
                            "VALIDATION_ERROR")  # fmt: skip
    assert "96000 Hz" in error["message"]
    clip = {"type": "audio", "data": b64(tone_wav(12.0, rate=8_000))}
    body = {"variant": "whisper-base", "task": "audio",
            "input": {"messages": [{"role": "user", "content": [clip, clip, clip]}]}}  # fmt: skip
    error = assert_envelope(client.post("/v1/jobs", json=body), 413, "PAYLOAD_TOO_LARGE")
    assert error["details"]["limit_seconds"] == 29


def test_big_wav_upload_uses_the_audio_cap_and_extensible_wav_is_accepted(client: httpx.Client) -> None:
    import io

    import numpy as np
    import soundfile

    out = io.BytesIO()
    soundfile.write(out, np.zeros(16_000, dtype=np.float32), 16_000, format="WAV", subtype="FLOAT")
    wav = out.getvalue()
    response = upload(client, wav, "float.wav")
    assert response.status_code == 201, response.text
