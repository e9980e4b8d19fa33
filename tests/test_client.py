"""gemmaq.client and the `gemmaq submit --stream` / `gemmaq batch` commands against the stack."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gemmaq.client import ApiError, Client
from tests.helpers.stack import Stack

pytestmark = pytest.mark.stack


def requests_file(path: Path, count: int) -> Path:
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "echo", "messages": [{"role": "user", "content": f"echo {i}"}]}}
        for i in range(count)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_stream_submit_and_errors(stack: Stack, key: str) -> None:
    with Client(stack.url, key) as gq:
        job_id = gq.submit(
            {"input": {"prompt": "A list of animals: cat, dog,"}, "params": {"max_new_tokens": 32}}
        )["id"]
        events = list(gq.stream(job_id))
        assert events[-1]["event"] == "done" and events[-1]["data"]["status"] == "succeeded"
        text = "".join(e["data"]["text"] for e in events if e["event"] == "delta")
        assert text == events[-1]["data"]["result"]["text"] == gq.get(job_id)["result"]["text"]
        with pytest.raises(ApiError) as refused:
            gq.submit({"variant": "gemma-9-nope", "input": {"prompt": "x"}})
        assert refused.value.code == "UNKNOWN_VARIANT" and refused.value.status == 422


def test_batch_upload_run_and_download_with_progress(stack: Stack, key: str, tmp_path: Path) -> None:
    path = requests_file(tmp_path / "in.jsonl", 5)
    sent: list[int] = []
    done: list[int] = []
    with Client(stack.url, key) as gq:
        file = gq.upload_batch(path, progress=sent.append)
        assert sum(sent) == path.stat().st_size == file["bytes"]
        batch = gq.create_batch(file["id"], run="client-test")
        ended = gq.wait_batch(batch["id"], poll_s=0.3, progress=done.append)
        assert (
            ended["status"] == "completed" and sum(done) == 5 and ended["metadata"] == {"run": "client-test"}
        )
        out = gq.download(ended["output_file_id"], tmp_path / "out.jsonl")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["custom_id"] for r in rows) == [f"r{i}" for i in range(5)]


def test_cli_streams_a_reply_and_runs_a_batch(stack: Stack, key: str, tmp_path: Path) -> None:
    env = stack.env | {"GEMMAQ_URL": stack.url, "GEMMAQ_API_KEY": key}
    streamed = subprocess.run(
        [sys.executable, "-m", "gemmaq", "submit", "Colours: red,", "--stream", "--max-new-tokens", "12"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.strip()
    path = requests_file(tmp_path / "in.jsonl", 3)
    out = tmp_path / "results.jsonl"
    ran = subprocess.run(
        [sys.executable, "-m", "gemmaq", "batch", str(path), "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr + ran.stdout
    assert "completed; 3 completed, 0 failed of 3" in ran.stdout
    assert len(out.read_text().splitlines()) == 3
