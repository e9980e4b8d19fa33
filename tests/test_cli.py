"""The `gemmaq` command as a user runs it: `submit` against the stack, and the one-command `dev`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gemmaq.embedded import free_port
from tests.helpers.stack import Stack

pytestmark = pytest.mark.stack

DEV_START_TIMEOUT_S = 600


def test_submit_prints_the_reply(stack: Stack) -> None:
    key = stack.new_key()
    env = stack.env | {"GEMMAQ_URL": stack.url, "GEMMAQ_API_KEY": key}
    done = subprocess.run(
        [sys.executable, "-m", "gemmaq", "submit", "four five six", "--variant", "echo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "four five six"


def test_users_create_prints_the_key_last(stack: Stack) -> None:
    out = stack.run_cli("users", "create", "cli-user")
    key = out.strip().splitlines()[-1]
    assert key.startswith("gq_")
    with stack.client(key) as c:
        assert c.get("/v1/jobs").status_code == 200
    # Only a hash and a short prefix are stored.
    hashed = "SELECT count(*) FROM api_keys WHERE hash = encode(sha256(%s::bytea), 'hex')"
    assert stack.sql(hashed, key) == [(1,)]
    assert stack.sql("SELECT count(*) FROM api_keys WHERE prefix = %s", key[:10]) == [(1,)]


def test_dev_runs_everything_on_embedded_servers(tmp_path: Path) -> None:
    """`gemmaq dev` with no GEMMAQ_* servers: embedded PostgreSQL and Redis, API, worker, a working curl."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GEMMAQ_")}
    env |= {"GEMMAQ_DATA_DIR": str(tmp_path / "data"), "PYTHONUNBUFFERED": "1"}
    if cache := os.environ.get("GEMMAQ_MODEL_CACHE"):
        env["GEMMAQ_MODEL_CACHE"] = cache
    port = free_port()
    log = tmp_path / "dev.log"
    with log.open("wb") as out:
        dev = subprocess.Popen(
            [sys.executable, "-m", "gemmaq", "dev", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + DEV_START_TIMEOUT_S
        while "Press Ctrl-C to stop." not in log.read_text(errors="replace"):
            assert dev.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "gemmaq dev did not come up"
            time.sleep(0.5)
        text = log.read_text(errors="replace")
        start = text.index("  curl -s -X POST")
        curl = text[start : text.index("Press Ctrl-C", start)].strip()
        done = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        job = httpx.Response(200, content=done.stdout).json()
        assert job["status"] == "succeeded", job
        assert "Paris" in job["result"]["text"] and job["result"]["usage"]["output_tokens"] > 0
        assert job["metrics"]["batch_size"] == 1
        key = re.search(r"Dev API key \(user \"dev\"\): (\S+)", text)
        assert key is not None
    finally:
        dev.send_signal(signal.SIGTERM)
        try:
            dev.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(dev.pid, signal.SIGKILL)
            raise
    assert dev.returncode == 0
