"""Real PostgreSQL and Redis for tests: the ones the environment names or runs, else embedded ones."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import redis

from gemmaq.embedded import EmbeddedServers

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


def _pg_answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2):
            return True
    except psycopg.Error:
        return False


def _redis_answers(url: str) -> bool:
    try:
        with redis.Redis.from_url(url, socket_connect_timeout=2) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


@contextmanager
def shared_servers(scratch: Path) -> Iterator[tuple[str, str]]:
    """Yield (admin PostgreSQL URL, Redis URL)."""
    embedded = EmbeddedServers(scratch / "embedded")
    pg = os.environ.get("GEMMAQ_TEST_DATABASE_URL") or DEFAULT_PG
    rd = os.environ.get("GEMMAQ_TEST_REDIS_URL") or DEFAULT_REDIS
    try:
        if not _pg_answers(pg):
            pg = embedded.postgres("postgres")
        if not _redis_answers(rd):
            rd = embedded.redis()
        yield pg, rd
    finally:
        embedded.stop()


@contextmanager
def scratch_database(admin_url: str) -> Iterator[str]:
    """A new database for this run, dropped afterwards."""
    name = f"gemmaq_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = "postgresql://" + _rebuild(admin_url, name)
    try:
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _rebuild(url: str, dbname: str) -> str:
    """Swap the database name in a postgresql:// URL, keeping host, user and query."""
    rest = url.split("://", 1)[1]
    authority, _, path = rest.partition("/")
    _, _, query = path.partition("?")
    return f"{authority}/{dbname}" + (f"?{query}" if query else "")


def drop_namespace(redis_url: str, namespace: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        if keys:
            client.delete(*keys)
