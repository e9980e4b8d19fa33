"""The compose deployment, run for real: Debian's docker-compose 1.29 on this machine's Docker
engine, the images built offline (`make images`), and stand-ins for the third-party images
(deploy/images/standins.sh) unless POSTGRES_IMAGE and the others name reachable ones."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from gemmaq.embedded import free_port

ROOT = Path(__file__).resolve().parents[2]
STANDINS = {
    "POSTGRES_IMAGE": "gemmaq-standin/postgres:15",
    "REDIS_IMAGE": "gemmaq-standin/redis:7",
    "PROMETHEUS_IMAGE": "gemmaq-standin/prometheus:2",
}
BASE_STANDIN = "gemmaq-standin/python:3.11"
# Services the test run starts (`--profile cpu`; Grafana, profile `monitoring`, has no Debian
# package and so no stand-in: it is left out).
SERVICES = ("postgres", "redis", "migrate", "api", "reconciler", "worker-cpu", "flower", "prometheus")
# What docker-compose.ha.yml adds.
HA_FILE = "docker-compose.ha.yml"
HA_SERVICES = ("redis-replica", "sentinel-1", "sentinel-2", "sentinel-3")


def docker_missing() -> str | None:
    """Why the deploy tier cannot run here, or None when it can."""
    if shutil.which("docker") is None or shutil.which("docker-compose") is None:
        return "docker and docker-compose are not installed (.ci/run installs them)"
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return "no Docker engine answers (.ci/run starts dockerd)"
    return None


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 900, check: bool = True) -> str:
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        said = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        raise AssertionError(f"{' '.join(args)} exited {done.returncode}:\n{said}")
    return done.stdout


def build_images() -> dict[str, str]:
    """The stand-ins where the official images are not named, then both gemmaq images, built
    with the network off. Returns the image settings the deployment runs with."""
    images = {name: os.environ.get(name, standin) for name, standin in STANDINS.items()}
    base = os.environ.get("BASE_IMAGE", BASE_STANDIN)
    if base == BASE_STANDIN or set(images.values()) & set(STANDINS.values()):
        run("deploy/images/standins.sh")
    tag = uuid.uuid4().hex[:8]
    images["GEMMAQ_API_IMAGE"] = f"gemmaq-api:test-{tag}"
    images["GEMMAQ_WORKER_IMAGE"] = f"gemmaq-worker:test-{tag}"
    run("make", "images", f"BASE_IMAGE={base}", f"API_IMAGE={images['GEMMAQ_API_IMAGE']}",
        f"WORKER_IMAGE={images['GEMMAQ_WORKER_IMAGE']}")  # fmt: skip
    return images


class Compose:
    """One compose project of its own (name, volumes, free ports on 127.0.0.1), run from the
    base file and the override files in `files`."""

    def __init__(self, images: dict[str, str], folder: Path) -> None:
        self.files = ["docker-compose.yml"]
        self.project = f"gemmaqtest{uuid.uuid4().hex[:8]}"
        self.api_port, self.prometheus_port = free_port(), free_port()
        hf = folder / "hf"
        hf.mkdir()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("GEMMAQ_", "POSTGRES_", "REDIS_"))},
            **images,
            "COMPOSE_PROJECT_NAME": self.project,
            "POSTGRES_PASSWORD": uuid.uuid4().hex,
            "REDIS_PASSWORD": uuid.uuid4().hex,
            "FLOWER_PASSWORD": uuid.uuid4().hex,
            "GRAFANA_PASSWORD": uuid.uuid4().hex,
            "API_BIND": "127.0.0.1",
            "API_PORT": str(self.api_port),
            "FLOWER_PORT": str(free_port()),
            "PROMETHEUS_PORT": str(self.prometheus_port),
            "HF_HOME_HOST": str(hf),
        }
        self.url = f"http://127.0.0.1:{self.api_port}"
        self.prometheus = f"http://127.0.0.1:{self.prometheus_port}"

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> str:
        named = [flag for file in self.files for flag in ("-f", file)]
        return run(
            "docker-compose", *named, "--profile", "cpu", *args, env=self.env, timeout=timeout, check=check
        )

    @property
    def services(self) -> tuple[str, ...]:
        """The services `up` starts with these files."""
        return SERVICES + (HA_SERVICES if HA_FILE in self.files else ())

    def redis_cli(self, service: str, *args: str, port: int = 6379) -> str:
        """A redis-cli command run in the service's container, with the deployment's password."""
        auth = ["-a", self.env["REDIS_PASSWORD"], "--no-auth-warning"] if port == 6379 else []
        return self("exec", "-T", service, "redis-cli", "-p", str(port), *auth, *args)

    def container(self, service: str) -> dict[str, Any]:
        """`docker inspect` of the service's (one) container."""
        ids = self("ps", "-a", "-q", service).split()
        assert len(ids) == 1, (service, ids)
        return json.loads(run("docker", "inspect", ids[0]))[0]  # type: ignore[no-any-return]

    def wait_healthy(self, timeout: float = 300) -> float:
        """Seconds until every long-running service is healthy (running, where it has no health
        check) and migrate has exited 0."""
        started = time.monotonic()
        while True:
            states = {}
            for service in self.services:
                ids = self("ps", "-a", "-q", service).split()
                if not ids:
                    states[service] = "absent"
                    continue
                state = json.loads(run("docker", "inspect", "-f", "{{json .State}}", ids[0]))
                if service == "migrate":
                    done = state["Status"] == "exited" and state["ExitCode"] == 0
                    states[service] = "ok" if done else state["Status"]
                elif "Health" in state:
                    health = state["Health"]["Status"]
                    states[service] = "ok" if health == "healthy" else health
                else:
                    states[service] = "ok" if state["Status"] == "running" else state["Status"]
            if all(state == "ok" for state in states.values()):
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                logs = self("logs", "--tail", "40")
                raise AssertionError(f"not healthy after {timeout} s: {states}\n{logs}")
            time.sleep(2)

    def psql(self, sql: str) -> list[list[str]]:
        """Rows of a query run by psql in the compose PostgreSQL container."""
        out = self("exec", "-T", "postgres", "psql", "-U", "gemmaq", "-d", "gemmaq", "-tAF", "|", "-c", sql)
        return [line.split("|") for line in out.splitlines() if line]

    def processes(self, service: str) -> dict[int, str]:
        """pid → command line of every process in the service's container, read from /proc by
        the container's own Python (the images have no ps)."""
        script = (
            "import os, json; out = {}\n"
            "for p in filter(str.isdigit, os.listdir('/proc')):\n"
            "    try: out[p] = open(f'/proc/{p}/cmdline', 'rb').read().replace(b'\\0', b' ').decode()\n"
            "    except OSError: pass\n"
            "print(json.dumps(out))"
        )
        found = json.loads(self("exec", "-T", service, "python", "-c", script))
        return {int(pid): cmd for pid, cmd in found.items()}

    def kill(self, service: str, pid: int) -> None:
        """SIGKILL from inside the container: a crash, not `docker kill` (a manual stop to Docker)."""
        self("exec", "-T", service, "python", "-c", f"import os, signal; os.kill({pid}, signal.SIGKILL)")
