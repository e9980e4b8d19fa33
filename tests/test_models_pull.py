"""`gemmaq models pull` against a stand-in for the Hugging Face Hub, served by the test.

The stand-in answers the Hub API's shape for what `snapshot_download` asks: the model's
revision (`/api/models/{repo}/revision/{rev}`), its file tree (`/api/models/{repo}/tree/{rev}`)
and each file (`HEAD`/`GET /{repo}/resolve/{rev}/{file}` with `X-Repo-Commit`, `ETag` and
`Content-Length`). The CLI runs as a subprocess, so HF_ENDPOINT, HF_HOME and HF_TOKEN are read by
huggingface_hub exactly as on a host.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from core.variants import Variant, VariantRegistry, hf_snapshot, weights_problem

pytestmark = pytest.mark.unit

REPO = "acme/tiny-gemma"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_test_token_123"
PATTERNS = ["*.json", "model*.safetensors", "tokenizer.model"]
FILES: dict[str, bytes] = {
    "config.json": b'{"model_type": "gemma3_text"}',
    "tokenizer_config.json": b'{"model_max_length": 8192}',
    "model.safetensors": bytes(range(256)) * 64,
    "tokenizer.model": b"sentencepiece model bytes",
    "README.md": b"# not fetched",
    "original/consolidated.pth": b"not fetched either",
}
WANTED = {"config.json", "tokenizer_config.json", "model.safetensors", "tokenizer.model"}


@dataclass
class Hub:
    url: str
    # method, path, Authorization: every request, the library's own look-ups included
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    require_token: bool = True


def _handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _send(self, status: int, payload: bytes, headers: dict[str, str], body: bool) -> None:
            self.send_response(status)
            for name, value in {"Content-Length": str(len(payload)), **headers}.items():
                self.send_header(name, value)
            self.end_headers()
            if body:
                self.wfile.write(payload)

        def _json(self, status: int, data: object, body: bool) -> None:
            self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json"}, body)

        def _answer(self, *, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            auth = self.headers.get("Authorization")
            hub.requests.append((self.command, path, auth))
            if hub.require_token and auth != f"Bearer {TOKEN}":
                self._json(401, {"error": "Invalid credentials in Authorization header"}, body)
                return
            api = f"/api/models/{REPO}/"
            resolve = f"/{REPO}/resolve/"
            if path.startswith(api + "revision/"):
                siblings = [{"rfilename": name} for name in FILES]
                self._json(200, {"id": REPO, "modelId": REPO, "sha": COMMIT, "siblings": siblings}, body)
            elif path.startswith(api + "tree/"):
                tree: list[dict[str, object]] = [{"type": "directory", "oid": "f" * 40, "path": "original"}]
                tree += [
                    {"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data), "path": name}
                    for name, data in FILES.items()
                ]
                self._json(200, tree, body)
            elif path.startswith(resolve) and path[len(resolve) :].partition("/")[2] in FILES:
                data = FILES[path[len(resolve) :].partition("/")[2]]
                headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
                start = int(self.headers.get("Range", "bytes=0-")[len("bytes=") :].split("-")[0] or 0)
                status = 206 if start else 200
                self._send(
                    status, data[start:], {**headers, "Content-Type": "application/octet-stream"}, body
                )
            else:
                self._json(404, {"error": "Repository not found"}, body)

    return Handler


@pytest.fixture
def hub() -> Iterator[Hub]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    hub = Hub(url=f"http://127.0.0.1:{server.server_address[1]}")
    server.RequestHandlerClass = _handler(hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield hub
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _variants_file(tmp_path: Path) -> Path:
    path = tmp_path / "variants.toml"
    path.write_text(
        f"""
[variants.tiny-hub]
family = "gemma-3"
size = "tiny"
tasks = ["text"]
source = "hf"
hf_id = "{REPO}"
hf_allow_patterns = {json.dumps(PATTERNS)}

[variants.echo]
family = "diagnostic"
size = "0"
tasks = ["text"]
source = "echo"
engine = "echo"
"""
    )
    return path


def _pull(hub: Hub, tmp_path: Path, variant: str, token: str | None) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GEMMAQ_", "HF_", "HUGGING_FACE_")) and k != "TRANSFORMERS_OFFLINE"
    }
    env |= {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",  # as in the image: the command itself goes online
        "GEMMAQ_VARIANTS_FILE": str(_variants_file(tmp_path)),
        "NO_PROXY": "127.0.0.1",
    }
    if token is not None:
        env["HF_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "gemmaq", "models", "pull", variant],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_pull_fetches_the_variants_files_into_the_cache(
    hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = _pull(hub, tmp_path, "tiny-hub", TOKEN)
    assert done.returncode == 0, done.stderr

    snapshot = tmp_path / "hf" / "hub" / "models--acme--tiny-gemma" / "snapshots" / COMMIT
    fetched = {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}
    assert fetched == WANTED  # the patterns filtered out README.md and original/
    for name in WANTED:
        assert (snapshot / name).read_bytes() == FILES[name]
    # Only the wanted files were asked for, and every request carried the token.
    asked = {path.rpartition(f"/{COMMIT}/")[2] for _, path, _ in hub.requests if "/resolve/" in path}
    assert asked == WANTED
    assert {auth for _, path, auth in hub.requests if REPO in path} == {f"Bearer {TOKEN}"}

    # It says what it fetched: each file, the total size and the cache path.
    lines = done.stdout.strip().splitlines()
    assert {line.split("\t")[0] for line in lines[:-1]} == WANTED
    total = sum(len(FILES[name]) for name in WANTED)
    assert lines[-1] == f"tiny-hub: 4 files, {total / 1024:.1f} KiB from {REPO} in {snapshot}"

    # The workers find it there offline: their weights check reads the same cache.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    assert hf_snapshot(REPO) == snapshot
    variant = Variant(
        name="tiny-hub", family="gemma-3", size="tiny", tasks=("text",), source="hf", hf_id=REPO
    )
    assert weights_problem(variant, VariantRegistry({variant.name: variant})) is None

    # A second pull finds everything cached and fetches no file again.
    before = len([r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]])
    again = _pull(hub, tmp_path, "tiny-hub", TOKEN)
    assert again.returncode == 0, again.stderr
    assert len([r for r in hub.requests if r[0] == "GET" and "/resolve/" in r[1]]) == before


def test_pull_without_a_token_is_refused_plainly(hub: Hub, tmp_path: Path) -> None:
    done = _pull(hub, tmp_path, "tiny-hub", None)
    assert done.returncode == 1
    assert "tiny-hub: acme/tiny-gemma:" in done.stderr
    assert "Traceback" not in done.stderr
    assert {auth for _, path, auth in hub.requests if REPO in path} == {None}
    assert not (tmp_path / "hf" / "hub" / "models--acme--tiny-gemma" / "snapshots").exists()


def test_pull_refuses_variants_that_do_not_come_from_the_hub(hub: Hub, tmp_path: Path) -> None:
    done = _pull(hub, tmp_path, "echo", TOKEN)
    assert done.returncode == 1
    assert "echo: its weights do not come from the Hugging Face Hub" in done.stderr
    assert hub.requests == []
