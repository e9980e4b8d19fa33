"""`gemmaq dev`: everything on one machine with one command.

Uses GEMMAQ_DATABASE_URL / GEMMAQ_REDIS_URL when set, else starts an embedded
PostgreSQL and Redis under the data folder; migrates; makes a dev API key; runs
the API, a worker and the reconciler as child processes and prints a curl to paste.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import typer

from core.settings import Settings
from gemmaq.admin import create_user_with_key
from gemmaq.embedded import EmbeddedServers, free_port

READY_TIMEOUT_S = 900  # the first start converts the GGUF (~1 min on a laptop CPU)


def choose_log_format() -> None:
    """Readable logs for a person at a terminal, JSON everywhere else.

    Decided once, from where the logs go (stderr), before the settings are read: the children
    (API, worker and its engine, reconciler) inherit GEMMAQ_LOG_JSON with the environment, so
    they follow this process. An explicit GEMMAQ_LOG_JSON always wins.
    """
    if "GEMMAQ_LOG_JSON" not in os.environ and sys.stderr.isatty():
        os.environ["GEMMAQ_LOG_JSON"] = "false"


def run_dev(settings: Settings, *, variants: str | None, port: int | None) -> None:
    servers = EmbeddedServers(settings.data_dir)
    children: list[subprocess.Popen[bytes]] = []
    try:
        database_url = settings.database_url or servers.postgres()
        redis_url = settings.redis_url or servers.redis()
        settings = settings.model_copy(update={"database_url": database_url, "redis_url": redis_url})
        from migrations import upgrade_head

        upgrade_head(settings.db_url)
        key = asyncio.run(create_user_with_key(settings, "dev", admin=True, reuse=True))
        port = port or free_port(settings.api_port)
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "GEMMAQ_DATABASE_URL": database_url, "GEMMAQ_REDIS_URL": redis_url}
        names = variants or settings.default_variant
        me = [sys.executable, "-m", "gemmaq"]
        children.append(subprocess.Popen([*me, "api", "--host", "127.0.0.1", "--port", str(port)], env=env))
        children.append(subprocess.Popen([*me, "worker", "--variants", names], env=env))
        children.append(subprocess.Popen([*me, "reconciler"], env=env))
        typer.echo(f"gemmaq: starting API on {url} and a worker for {names} (first start converts weights)…")
        _wait_ready(url, key, names.split(",")[0], children)
        _banner(url, key, names.split(",")[0])
        _supervise(children)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
        servers.stop()


def _wait_ready(url: str, key: str, variant: str, children: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    headers = {"Authorization": f"Bearer {key}"}
    while time.monotonic() < deadline:
        for child in children:
            if child.poll() is not None:
                raise typer.Exit(f"a gemmaq process exited with code {child.returncode}")  # type: ignore[arg-type]
        try:
            models = httpx.get(f"{url}/v1/models", headers=headers, timeout=5).json()["data"]
            states = [w["state"] for m in models if m["id"] == variant for w in m["workers"]]
            if "warm" in states:
                return
            if states and all(s == "unavailable" for s in states):
                reason = next(m["unavailable_reason"] for m in models if m["id"] == variant)
                typer.echo(f"gemmaq: variant {variant} is unavailable: {reason}", err=True)
                return
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(1)
    typer.echo("gemmaq: the worker is not ready yet; jobs will wait in the queue", err=True)


def _banner(url: str, key: str, variant: str) -> None:
    body = json.dumps(
        {
            "variant": variant,
            "task": "text",
            "input": {"prompt": "The capital city of Germany is Berlin. The capital city of France is"},
            "params": {"max_new_tokens": 16},
        }
    )
    typer.echo(
        f"""
gemmaq is ready: API {url} (docs at {url}/docs), worker for {variant}.
Dev API key (user "dev"): {key}

Submit a job and wait for its result:

  curl -s -X POST {url}/v1/jobs \\
    -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\
    -d '{body}' \\
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])' \\
  | xargs -I{{}} curl -s '{url}/v1/jobs/{{}}?wait=60' -H 'Authorization: Bearer {key}'

Press Ctrl-C to stop.
""".rstrip()
    )


def _supervise(children: list[subprocess.Popen[bytes]]) -> None:
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    while not stop:
        for child in children:
            if child.poll() is not None:
                typer.echo(f"gemmaq: a process exited with code {child.returncode}; stopping", err=True)
                return
        time.sleep(0.5)
