"""A bounded schemathesis run against /openapi.json: no 500, no response outside the documented schema.

It targets an API process of its own whose Redis namespace no worker consumes, so the jobs the
fuzzer manages to submit stay queued and never load the CPU the other tests use.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from gemmaq.embedded import free_port
from tests.helpers.stack import Stack, wait_healthy

pytestmark = pytest.mark.stack

CHECKS = "not_a_server_error,response_schema_conformance,content_type_conformance,status_code_conformance"


def test_openapi_contract_holds_under_fuzzing(stack: Stack, tmp_path: Path) -> None:
    port = free_port()
    env = stack.env | {"GEMMAQ_NAMESPACE": f"fuzz-{uuid.uuid4().hex[:8]}"}
    with (tmp_path / "api.log").open("wb") as log:
        api = subprocess.Popen(
            [sys.executable, "-m", "gemmaq", "api", "--port", str(port)], env=env, stdout=log, stderr=log
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, api)
        st = shutil.which("st", path=str(Path(sys.executable).parent)) or "st"
        command = [st, "run", f"{url}/openapi.json", "--checks", CHECKS, "--no-color"]
        command += ["--max-examples", "25", "--seed", "7", "--request-timeout", "60"]
        command += ["--header", f"Authorization: Bearer {stack.new_key('fuzz')}"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    finally:
        api.terminate()
        api.wait(timeout=30)
    assert '"request.unhandled"' not in (tmp_path / "api.log").read_text(), (
        "the API logged an unhandled error"
    )
