"""Where gemmaq's Redis is: one URL (`GEMMAQ_REDIS_URL`), a plain Redis or a Sentinel group.

- `redis://[[user]:password@]host:port/db` (or `rediss://`, `unix://`): one Redis;
- `redis+sentinel://[[user]:password@]host[:port][,host[:port]…]/service[/db]
  [?sentinel_password=…&sentinel_username=…]`: the sentinels (port 26379 unless given), the
  name they know the master by, and the database. The user and password before `@` are the
  master's (and its replicas'); `sentinel_password` is the sentinels' own, when they ask for one.

Every Redis client gemmaq makes comes from here: the synchronous and asyncio clients, and the
Celery broker's URL and transport. A client of a Sentinel group asks a sentinel where the master
is before each new connection. A connection that finds its server demoted (`READONLY` after a
failover) is closed and raises `ConnectionError`, which the clients' one retry answers on a new
connection to the master the sentinels name (redis-py's SentinelManagedConnection).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import redis
from redis.asyncio import BlockingConnectionPool as AsyncBlockingPool
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio import sentinel as async_sentinel
from redis.sentinel import Sentinel

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
# A sentinel that does not answer within this is skipped for the next one.
SENTINEL_TIMEOUT_S = 0.5


@dataclass(frozen=True)
class RedisTarget:
    url: str
    sentinels: tuple[tuple[str, int], ...] = ()  # empty: a plain Redis at `url`
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None

    @property
    def via_sentinel(self) -> bool:
        return bool(self.sentinels)

    def master_kwargs(self) -> dict[str, Any]:
        """The master's credentials and database, as redis-py's connection arguments."""
        return {"db": self.db, "username": self.username, "password": self.password}

    def sentinel_kwargs(self) -> dict[str, Any]:
        """How to reach a sentinel: its own credentials, and timeouts short enough that a dead
        one is skipped quickly."""
        return {
            "username": self.sentinel_username,
            "password": self.sentinel_password,
            "socket_connect_timeout": SENTINEL_TIMEOUT_S,
            "socket_timeout": SENTINEL_TIMEOUT_S,
        }


def parse(url: str) -> RedisTarget:
    """The target a `GEMMAQ_REDIS_URL` names; ValueError, naming the part, when it is malformed."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        return RedisTarget(url=url)
    credentials, _, hosts = parts.netloc.rpartition("@")
    username, _, password = credentials.partition(":") if credentials else ("", "", "")
    sentinels = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "")
        if not host or (port and not port.isdigit()):
            raise ValueError(f"{SENTINEL_SCHEME} URL: bad sentinel address {item!r} (host:port)")
        sentinels.append((host, int(port) if port else SENTINEL_PORT))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError(f"{SENTINEL_SCHEME} URL: the path must be /service-name or /service-name/db")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    unknown = set(query) - {"sentinel_password", "sentinel_username"}
    if unknown:
        raise ValueError(f"{SENTINEL_SCHEME} URL: unknown option(s) {', '.join(sorted(unknown))}")
    return RedisTarget(
        url=url,
        sentinels=tuple(sentinels),
        service=unquote(path[0]),
        db=int(path[1]) if len(path) == 2 else 0,
        username=unquote(username) or None,
        password=unquote(password) or None,
        sentinel_username=query.get("sentinel_username") or None,
        sentinel_password=query.get("sentinel_password") or None,
    )


def sync_client(url: str, **options: Any) -> redis.Redis:
    """A synchronous client of the target; `options` are redis-py's (timeouts, retry)."""
    target = parse(url)
    if not target.via_sentinel:
        return redis.Redis.from_url(url, **options)
    manager = Sentinel(list(target.sentinels), sentinel_kwargs=target.sentinel_kwargs())
    client: redis.Redis = manager.master_for(
        target.service, redis_class=redis.Redis, **target.master_kwargs(), **options
    )
    return client


class _BlockingSentinelPool(async_sentinel.SentinelConnectionPool, AsyncBlockingPool):
    """The master's connections, found through the sentinels, bounded as BlockingConnectionPool
    bounds them: past `max_connections` a command waits for one (up to `timeout`)."""


def async_client(url: str, *, max_connections: int, timeout: float, **options: Any) -> AsyncRedis:
    """An asyncio client with a bounded pool of `max_connections`, where a command waits up to
    `timeout` for a free one; `options` are redis-py's."""
    target = parse(url)
    if not target.via_sentinel:
        pool = AsyncBlockingPool.from_url(url, max_connections=max_connections, timeout=timeout, **options)
        return AsyncRedis(connection_pool=pool)
    manager = async_sentinel.Sentinel(list(target.sentinels), sentinel_kwargs=target.sentinel_kwargs())
    client: AsyncRedis = manager.master_for(
        target.service,
        redis_class=AsyncRedis,
        connection_pool_class=_BlockingSentinelPool,
        max_connections=max_connections,
        timeout=timeout,
        **target.master_kwargs(),
        **options,
    )
    return client


def kombu_broker(url: str) -> tuple[str, dict[str, Any]]:
    """The Celery broker URL for the target, and the transport options it needs besides
    gemmaq's own (kombu's `sentinel://` transport takes one URL per sentinel, joined by `;`)."""
    target = parse(url)
    if not target.via_sentinel:
        return url, {}
    credentials = ""
    if target.password is not None or target.username is not None:
        credentials = f"{_quote(target.username or '')}:{_quote(target.password or '')}@"
    broker = ";".join(f"sentinel://{credentials}{host}:{port}/{target.db}" for host, port in target.sentinels)
    return broker, {"master_name": target.service, "sentinel_kwargs": target.sentinel_kwargs()}


def _quote(value: str) -> str:
    return quote(value, safe="")
