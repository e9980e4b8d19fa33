"""Job bodies and submissions the tests share: text, image and audio jobs, uploaded files."""

from __future__ import annotations

from typing import Any

import httpx

VISION = "tiny-gemma-3-vision"
AUDIO = "tiny-gemma-3n"
GEMMA4 = "tiny-gemma-4"  # text, images and audio
# A text job on the default variant that decodes for a while: its deltas come one by one.
ESSAY = {
    "input": {"prompt": "Here is a long essay about lighthouses, part 1:\n\n"},
    "params": {"max_new_tokens": 64},
}


def submit(client: httpx.Client, body: dict[str, Any], **headers: str) -> dict[str, Any]:
    """`POST /v1/jobs`, which must accept the job (202, with its Location)."""
    response = client.post("/v1/jobs", json=body, headers=headers)
    assert response.status_code == 202, response.text
    assert response.headers["Location"] == f"/v1/jobs/{response.json()['id']}"
    return response.json()  # type: ignore[no-any-return]


def text_job(prompt: str, variant: str = "gemma-3-270m", **params: Any) -> dict[str, Any]:
    return {
        "variant": variant,
        "task": "text",
        "input": {"prompt": prompt},
        "params": {"max_new_tokens": 8} | params,
    }


def image_job(part: dict[str, Any], variant: str = VISION, task: str = "image") -> dict[str, Any]:
    content = [{"type": "image", **part}, {"type": "text", "text": "Describe this picture."}]
    return {"variant": variant, "task": task, "input": {"messages": [{"role": "user", "content": content}]}}


def audio_job(part: dict[str, Any], variant: str = AUDIO) -> dict[str, Any]:
    return {"variant": variant, "task": "audio", "input": {"messages": [{"role": "user", "content": [
        {"type": "audio", **part}]}]}}  # fmt: skip


def upload(client: httpx.Client, data: bytes, name: str, purpose: str = "media") -> httpx.Response:
    return client.post("/v1/files", files={"file": (name, data)}, data={"purpose": purpose})
