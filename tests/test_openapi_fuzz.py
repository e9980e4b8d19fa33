"""A bounded schemathesis run against /openapi.json, with hostile strings: no 500, no response
outside the documented schema, and no job left unfinished.

Every free string the schema describes (in JSON bodies, forms and query strings) is drawn from
tests/helpers/fuzz_hooks.py: lone surrogates, NULs, non-ASCII digits, long runs. The run targets a
namespace and a database of its own, with its own API, reconciler and worker (the 270M and echo only, and a
tenant with a small token quota, so the fuzzer's jobs stay cheap). Two batch input files are
uploaded first, with hostile lines beside good ones, for the fuzzer's batches to name. Every job
and batch the fuzzer made must then reach an end, and the worker must still be up.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from core.schemas import TERMINAL_STATUSES
from gemmaq.embedded import free_port
from tests.helpers.batches import jsonl, line
from tests.helpers.servers import drop_namespace, scratch_database
from tests.helpers.stack import Stack, wait_healthy
from tests.helpers.variants import shipped_variants

pytestmark = pytest.mark.stack

CHECKS = "not_a_server_error,response_schema_conformance,content_type_conformance,status_code_conformance"
SERVED = ("gemma-3-270m", "echo")
BATCH_ENDS = {"completed", "failed", "cancelled", "expired"}
SETTLE_S = 240
# Batch lines that are not text, or barely: a JSON-escaped lone surrogate, a NUL, a custom_id of
# non-ASCII digits, a body that is not an object, and a very long run; good lines around them.
HOSTILE_LINES: list[dict[str, Any] | bytes] = [
    line(1, model="gemma-3-270m"),
    b'{"custom_id": "req-2", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "echo", '
    b'"messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 4}}',
    line(3, messages=[{"role": "user", "content": "nul \x00 here"}]),
    line(4) | {"custom_id": "\u00b2\u0663"},
    {"custom_id": "req-5", "method": "POST", "url": "/v1/chat/completions", "body": "\x00"},
    line(6, messages=[{"role": "user", "content": "\u00e9" * 70_000}]),
    line(7),
]


def variants_file_of(names: tuple[str, ...]) -> str:
    """The shipped variants file cut down to its [defaults] and the variants `names`."""
    sections = re.split(r"(?m)^(?=\[)", shipped_variants())
    keep = {"[defaults]", *(f"[variants.{n}]" for n in names)}
    return "".join(s for s in sections if s.split("\n", 1)[0].strip() in keep)


def _pages(client: httpx.Client, path: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    params: dict[str, Any] = {"limit": 100}
    while True:
        page = client.get(path, params=params)
        assert page.status_code == 200, page.text
        body = page.json()
        items += body["data"]
        if not body.get("has_more") or not body["data"]:
            return items
        cursor = body.get("next_cursor")
        params = {"limit": 100, **({"cursor": cursor} if cursor else {"after": body["data"][-1]["id"]})}


def test_openapi_contract_holds_under_hostile_fuzzing(stack: Stack, tmp_path: Path) -> None:
    namespace = f"fuzz-{uuid.uuid4().hex[:8]}"
    variants = tmp_path / "variants.toml"
    variants.write_text(variants_file_of(SERVED))
    with scratch_database(stack.database_url) as database_url:
        env = stack.env | {
            "GEMMAQ_NAMESPACE": namespace,
            "GEMMAQ_VARIANTS_FILE": str(variants),
            "GEMMAQ_DATABASE_URL": database_url,
        }
        fuzz = Stack(url=f"http://127.0.0.1:{free_port()}", database_url=database_url,
                     redis_url=stack.redis_url, namespace=namespace, env=env, logs=tmp_path)  # fmt: skip
        try:
            fuzz.run_cli("migrate")
            _fuzz(fuzz, fuzz.new_key("fuzz", tokens_per_day=8_000), tmp_path)
        finally:
            drop_namespace(stack.redis_url, namespace)
    for log in ("api.log", "worker.log", "reconciler.log"):
        text = (tmp_path / log).read_text(errors="replace")
        assert '"request.unhandled"' not in text, f"{log} logged an unhandled error"
        assert "Traceback" not in text, f"{log} logged an unhandled error"


def _fuzz(fuzz: Stack, key: str, tmp_path: Path) -> None:
    try:
        api = fuzz.gemmaq("api", "--port", fuzz.url.rsplit(":", 1)[1], log="api.log")
        fuzz.gemmaq("reconciler", log="reconciler.log")
        worker = fuzz.gemmaq(
            "worker", "--variants", ",".join(SERVED), "--device", "cpu", "--name", f"{fuzz.namespace}@fuzz",
            log="worker.log",
        )  # fmt: skip
        wait_healthy(fuzz.url, api)
        fuzz.wait_worker(key, list(SERVED))
        with fuzz.client(key) as client:
            files = [
                client.post("/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", body)})
                for body in (jsonl(HOSTILE_LINES), jsonl(HOSTILE_LINES[::-1]))
            ]
        assert all(f.is_success for f in files), [f.text for f in files]

        st = shutil.which("st", path=str(Path(sys.executable).parent)) or "st"
        command = [st, "run", f"{fuzz.url}/openapi.json", "--checks", CHECKS, "--no-color"]
        command += ["--max-examples", "25", "--seed", "7", "--request-timeout", "60"]
        command += ["--header", f"Authorization: Bearer {key}"]
        hooks = {
            "SCHEMATHESIS_HOOKS": "tests.helpers.fuzz_hooks",
            "GEMMAQ_FUZZ_VARIANTS": ",".join(SERVED),
            "GEMMAQ_FUZZ_FILES": ",".join(f.json()["id"] for f in files),
        }
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=900, env=fuzz.env | hooks,
            cwd=Path(__file__).resolve().parents[1],
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]

        # Everything the fuzzer got accepted reaches an end, on a worker that is still up.
        with fuzz.client(key) as client:
            deadline = time.monotonic() + SETTLE_S
            while True:
                jobs = _pages(client, "/v1/jobs")
                batches = _pages(client, "/v1/batches")
                open_jobs = [j["id"] for j in jobs if j["status"] not in TERMINAL_STATUSES]
                open_batches = [b["id"] for b in batches if b["status"] not in BATCH_ENDS]
                if (not open_jobs and not open_batches) or time.monotonic() > deadline:
                    break
                time.sleep(2)
        assert worker.poll() is None, f"the fuzzing namespace's worker exited; see {tmp_path / 'worker.log'}"
        assert not open_jobs and not open_batches, f"open after {SETTLE_S} s: {open_jobs} {open_batches}"
        ends = Counter((j["status"], (j.get("error") or {}).get("code")) for j in jobs)
        assert ends[("succeeded", None)], f"no fuzzed job ran to its end, so nothing here was run: {ends}"
        assert batches, "the fuzzer made no batch, so no batch's lines were run"
        lost = [j["id"] for j in jobs if "worker was lost" in ((j.get("error") or {}).get("message") or "")]
        assert not lost, f"jobs whose worker died under them: {lost}"
    finally:
        fuzz.stop()
