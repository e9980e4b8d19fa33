"""A real stack per test session: its own database and Redis namespace, a real API and worker.

The API and the worker run as separate processes through the `gemmaq` command, exactly
as a deployment runs them; the worker serves the real Gemma 3 270M weights.
"""

from __future__ import annotations

import asyncio
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
import pytest

from core.schemas import QuotaUpdate
from core.settings import Settings
from gemmaq.admin import create_user_with_key
from gemmaq.embedded import free_port
from gemmaq.servers import PostgresProcess, RedisProcess
from tests.servers import drop_namespace, scratch_database, test_servers

ROOT = Path(__file__).resolve().parent.parent
WORKER_VARIANTS = (
    "gemma-3-270m,gemma-3-270m-nf4,echo,tiny-gemma-3-vision,tiny-gemma-3n,whisper-base,whisper-tiny-en"
)
# A variant no session worker serves: its jobs stay queued until a test starts a worker for it.
EXTRA_VARIANTS = """
[variants.echo-late]
family = "diagnostic"
size = "0"
tasks = ["text"]
source = "echo"
engine = "echo"
description = "test-only echo variant with no worker"

[variants.echo-held]
family = "diagnostic"
size = "0"
tasks = ["text"]
source = "echo"
engine = "echo"
description = "test-only echo variant that no worker ever serves: its jobs stay queued"

[variants.echo-slow]
family = "diagnostic"
size = "0"
tasks = ["text"]
source = "echo"
engine = "echo"
max_batch_size = 4
echo_delay_ms = 1500
description = "test-only echo variant whose batches take 1.5 s: jobs are running when a worker is killed"

[variants.echo-fair]
family = "diagnostic"
size = "0"
tasks = ["text"]
source = "echo"
engine = "echo"
max_batch_size = 1
description = "test-only echo variant, one job at a time, served only by the scheduling test's worker"
"""


def cache_test_variants(model_cache: Path) -> str:
    """Whisper tiny.en and base again under other names (their converted weights mounted by
    path; `ct2_model` only says which model it is): only the workers of
    tests/test_variant_cache.py serve them."""
    return "".join(
        f"""
[variants.cache-{name}]
family = "whisper"
size = "test"
tasks = ["audio"]
source = "hf"
path = "{model_cache / name}"
engine = "whisper"
ct2_model = "{model}"
{ability}
max_audio_seconds = 29
dtype = "float32"
memory_mb = {mb}
description = "test-only copy of {name} for the variant cache tests"
"""
        for name, model, ability, mb in (
            ("whisper-tiny-en", "tiny.en", "english_only = true", 200),
            ("whisper-base", "base", "translate = true", 300),
        )
    )


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
        out = open(self.logs / log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
        proc = subprocess.Popen(
            [*self.gemmaq_command(), *args], env=self.env | (env or {}), stdout=out, stderr=subprocess.STDOUT
        )
        self.processes.append(proc)
        return proc

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


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    scratch = tmp_path_factory.mktemp("stack")
    variants_file = scratch / "variants.toml"
    variants_file.write_text(
        (ROOT / "core" / "variants.toml").read_text()
        + EXTRA_VARIANTS
        + cache_test_variants(Settings().model_cache)
    )
    empty_hf = scratch / "hf"
    empty_hf.mkdir()
    with test_servers(scratch) as (admin_pg, redis_url), scratch_database(admin_pg) as database_url:
        namespace = f"gqtest-{uuid.uuid4().hex[:10]}"
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("GEMMAQ_") or k == "GEMMAQ_MODEL_CACHE"
        }
        env |= {
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
        s = Stack(
            url=f"http://127.0.0.1:{port}",
            database_url=database_url,
            redis_url=redis_url,
            namespace=namespace,
            env=env,
            logs=scratch,
        )
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
            for proc in s.processes:
                if proc.poll() is None:
                    proc.terminate()
            for proc in s.processes:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            drop_namespace(redis_url, namespace)


@contextmanager
def private_stack(
    folder: Path, *, namespace: str, variants: str, env: dict[str, str]
) -> Iterator[tuple[Stack, PostgresProcess, RedisProcess]]:
    """A stack on a PostgreSQL and a Redis of its own (gemmaq.servers), for tests that stop,
    kill and restart them: `variants` is its variants file's text, `env` its GEMMAQ_* settings.
    Its processes (started with `Stack.gemmaq`) are killed at the end."""
    pg, rd = PostgresProcess(), RedisProcess(folder / "redis")
    pg.start()
    rd.start()
    variants_file = folder / "variants.toml"
    variants_file.write_text(variants)
    kept = {k: v for k, v in os.environ.items() if not k.startswith("GEMMAQ_") or k == "GEMMAQ_MODEL_CACHE"}
    stack = Stack(url=f"http://127.0.0.1:{free_port()}", database_url=pg.create_database("gemmaq"),
                  redis_url=rd.url, namespace=namespace, env=kept, logs=folder)  # fmt: skip
    stack.env |= {
        "GEMMAQ_DATABASE_URL": stack.database_url,
        "GEMMAQ_REDIS_URL": stack.redis_url,
        "GEMMAQ_NAMESPACE": namespace,
        "GEMMAQ_VARIANTS_FILE": str(variants_file),
        **env,
    }
    try:
        stack.run_cli("migrate")
        yield stack, pg, rd
    finally:
        for proc in stack.processes:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
        pg.remove()
        rd.stop()


@pytest.fixture
def key(stack: Stack) -> str:
    return stack.new_key()


@pytest.fixture
def client(stack: Stack, key: str) -> Iterator[httpx.Client]:
    with stack.client(key) as c:
        yield c


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
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json()
        if job["status"] in {"succeeded", "failed", "cancelled"} or time.monotonic() > deadline:
            return job


def gemma_270m_float32() -> tuple[Any, Any]:
    """Gemma 3 270M's converted weights in float32 (so batched and alone agree exactly) and its
    tokenizer, for the tests that drive the decoder in this process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.variants import load_variants
    from workers.runtime.loading import LOCAL, weights_dir

    registry = load_variants(None)
    variant = registry.get("gemma-3-270m")
    assert variant is not None
    path = weights_dir(variant, registry, Settings().model_cache)
    tokenizer = AutoTokenizer.from_pretrained(path, **LOCAL)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa", **LOCAL
    )
    return model.eval(), tokenizer
