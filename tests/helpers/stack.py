"""A real stack: its own database and Redis namespace, a real API, reconciler and worker.

The API and the worker run as separate processes through the `gemmaq` command, exactly
as a deployment runs them; the worker serves the real Gemma 3 270M weights.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

from core.schemas import TERMINAL_STATUSES, QuotaUpdate
from core.settings import Settings
from gemmaq.admin import create_user_with_key
from gemmaq.embedded import free_port
from gemmaq.servers import PostgresProcess, RedisHA, RedisProcess
from tests.helpers.servers import drop_namespace, scratch_database, shared_servers
from tests.helpers.variants import EXTRA_VARIANTS, WORKER_VARIANTS, cache_test_variants, shipped_variants

READY_TIMEOUT_S = 600  # a fresh machine converts the GGUF once (~1 min)


@dataclass
class Stack:
    url: str
    database_url: str
    redis_url: str
    namespace: str
    env: dict[str, str]
    logs: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def settings(self) -> Settings:
        return Settings(database_url=self.database_url, redis_url=self.redis_url, namespace=self.namespace)

    def new_key(self, prefix: str = "user", **quota: Any) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        limits = QuotaUpdate(**quota) if quota else None
        return asyncio.run(create_user_with_key(self.settings(), name, quota=limits))

    def client(self, key: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def sql(self, query: str, *args: object) -> list[tuple[object, ...]]:
        with psycopg.connect(self.database_url) as conn:
            cursor = conn.execute(query, args)
            return cursor.fetchall() if cursor.description else []

    @staticmethod
    def gemmaq_command() -> list[str]:
        return [sys.executable, "-m", "gemmaq"]

    def gemmaq(
        self, *args: str, log: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """`gemmaq ARGS` in a process of its own, its output appended to `log` in the logs folder."""
        with contextlib.ExitStack() as files:  # the child keeps its own copy of the log's descriptor
            out = files.enter_context((self.logs / log).open("ab")) if log else subprocess.DEVNULL
            proc = subprocess.Popen(
                [*self.gemmaq_command(), *args],
                env=self.env | (env or {}),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.processes.append(proc)
        return proc

    def stop(self) -> None:
        """Its processes asked to stop (SIGTERM), each killed if it has not within 30 s."""
        for proc in self.processes:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def run_cli(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "gemmaq", *args], env=self.env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def wait_worker(
        self, key: str, variants: list[str], timeout: float = READY_TIMEOUT_S, name: str | None = None
    ) -> None:
        """Until every variant is warm on some worker (on the worker `name`, when given)."""
        deadline = time.monotonic() + timeout
        with self.client(key) as c:
            while time.monotonic() < deadline:
                for proc in self.processes:
                    assert proc.poll() is None, f"a gemmaq process exited ({proc.args!r}); see {self.logs}"
                try:
                    models = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
                    warm = [
                        [
                            w
                            for w in models[v]["workers"]
                            if w["state"] == "warm" and name in (None, w["worker"])
                        ]
                        for v in variants
                    ]
                    if all(warm):
                        return
                except (httpx.HTTPError, KeyError):
                    pass
                time.sleep(0.5)
        raise TimeoutError(f"worker not warm for {variants}; see {self.logs}")


def _gemmaq_env() -> dict[str, str]:
    """This process's environment without its GEMMAQ_* settings (the model cache kept)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("GEMMAQ_") or k == "GEMMAQ_MODEL_CACHE"}


@contextmanager
def session_stack(scratch: Path) -> Iterator[Stack]:
    """The stack the `stack` fixture shares across a test session, its files under `scratch`:
    migrated, an admin user, an API, a reconciler and a CPU worker warm for WORKER_VARIANTS."""
    variants_file = scratch / "variants.toml"
    variants_file.write_text(
        shipped_variants() + EXTRA_VARIANTS + cache_test_variants(Settings().model_cache)
    )
    empty_hf = scratch / "hf"
    empty_hf.mkdir()
    with shared_servers(scratch) as (admin_pg, redis_url), scratch_database(admin_pg) as database_url:
        namespace = f"gqtest-{uuid.uuid4().hex[:10]}"
        env = _gemmaq_env() | {
            "GEMMAQ_DATABASE_URL": database_url,
            "GEMMAQ_REDIS_URL": redis_url,
            "GEMMAQ_NAMESPACE": namespace,
            "GEMMAQ_VARIANTS_FILE": str(variants_file),
            "GEMMAQ_WORKER_HEARTBEAT_S": "1",
            "GEMMAQ_LEASE_S": "4",
            "GEMMAQ_RECONCILE_INTERVAL_S": "0.5",
            "GEMMAQ_ENQUEUE_GRACE_S": "3",
            # The tests' webhook receivers listen on loopback; retries come fast.
            "GEMMAQ_WEBHOOK_ALLOW_HOSTS": '["127.0.0.1"]',
            "GEMMAQ_WEBHOOK_BACKOFF_S": "0.3",
            "GEMMAQ_WEBHOOK_INTERVAL_S": "0.2",
            "HF_HOME": str(empty_hf),  # so the real 4B+ variants are surely absent here
        }
        port = free_port()
        s = Stack(url=f"http://127.0.0.1:{port}", database_url=database_url, redis_url=redis_url,
                  namespace=namespace, env=env, logs=scratch)  # fmt: skip
        try:
            s.run_cli("migrate")
            admin_key = s.run_cli("users", "create", "admin", "--admin").strip().splitlines()[-1]
            s.gemmaq("api", "--port", str(port), log="api.log")
            s.gemmaq("reconciler", log="reconciler.log")
            s.gemmaq(
                "worker", "--variants", WORKER_VARIANTS, "--device", "cpu", "--name", f"{namespace}@test",
                log="worker.log",
            )  # fmt: skip
            s.wait_worker(admin_key, WORKER_VARIANTS.split(","))
            yield s
        finally:
            s.stop()
            drop_namespace(redis_url, namespace)


@contextmanager
def private_stack(
    folder: Path, *, namespace: str, variants: str, env: dict[str, str]
) -> Iterator[tuple[Stack, PostgresProcess, RedisProcess]]:
    """A stack on a PostgreSQL and a Redis of its own (gemmaq.servers), for tests that stop,
    kill and restart them: `variants` is its variants file's text, `env` its GEMMAQ_* settings.
    Its processes (started with `Stack.gemmaq`) are killed at the end."""
    pg, rd = PostgresProcess(), RedisProcess(folder / "redis")
    try:
        pg.start()
        rd.start()
        database = pg.create_database("gemmaq")
        with stack_on(folder, database, rd.url, namespace=namespace, variants=variants, env=env) as stack:
            yield stack, pg, rd
    finally:
        pg.remove()
        rd.stop()


@contextmanager
def ha_stack(
    folder: Path, *, namespace: str, variants: str, env: dict[str, str]
) -> Iterator[tuple[Stack, PostgresProcess, RedisHA]]:
    """`private_stack` on a Redis Sentinel group (a master, a replica, three sentinels)."""
    pg, ha = PostgresProcess(), RedisHA(folder / "redis")
    try:
        pg.start()
        ha.start()
        database = pg.create_database("gemmaq")
        with stack_on(folder, database, ha.url, namespace=namespace, variants=variants, env=env) as stack:
            yield stack, pg, ha
    finally:
        pg.remove()
        ha.stop()


@contextmanager
def stack_on(
    folder: Path, database_url: str, redis_url: str, *, namespace: str, variants: str, env: dict[str, str]
) -> Iterator[Stack]:
    """A migrated stack on the servers the URLs name; its processes are killed at the end."""
    variants_file = folder / "variants.toml"
    variants_file.write_text(variants)
    stack = Stack(url=f"http://127.0.0.1:{free_port()}", database_url=database_url, redis_url=redis_url,
                  namespace=namespace, env=_gemmaq_env(), logs=folder)  # fmt: skip
    stack.env |= {
        "GEMMAQ_DATABASE_URL": stack.database_url,
        "GEMMAQ_REDIS_URL": stack.redis_url,
        "GEMMAQ_NAMESPACE": namespace,
        "GEMMAQ_VARIANTS_FILE": str(variants_file),
        **env,
    }
    try:
        stack.run_cli("migrate")
        yield stack
    finally:
        for proc in stack.processes:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Until the API process at `url` answers /healthz (failing at once if it exits)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, f"the API process exited ({proc.returncode})"
        assert time.monotonic() < deadline, f"the API at {url} did not start"
        time.sleep(0.2)


def wait_job(client: httpx.Client, job_id: str, timeout: float = 180) -> dict[str, Any]:
    """The job once it has ended (or as it stands after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json()
        if job["status"] in TERMINAL_STATUSES or time.monotonic() > deadline:
            return job
