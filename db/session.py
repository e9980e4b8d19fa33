"""Engine and session factories. The caller owns the transaction; repositories never commit."""

from __future__ import annotations

import functools
import time
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker


@functools.cache
def sync_engine(url: str) -> Engine:
    # hide_parameters: bound values (prompts, outputs) never appear in exception messages or logs.
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, hide_parameters=True)


@functools.cache
def autocommit_engine(url: str) -> Engine:
    """For work that is one statement (a job's claim, its finish): each its own transaction, in
    one round trip (no BEGIN, no COMMIT). No pre-ping either: its callers retry on
    OperationalError, and the error that a stale connection raises invalidates the pool."""
    return create_engine(
        url, isolation_level="AUTOCOMMIT", pool_size=10, max_overflow=20, hide_parameters=True
    )


@functools.cache
def sync_sessionmaker(url: str) -> sessionmaker:  # type: ignore[type-arg]
    return sessionmaker(sync_engine(url), expire_on_commit=False)


def async_engine(url: str) -> AsyncEngine:
    engine = create_async_engine(url, pool_size=20, max_overflow=20, hide_parameters=True)
    ping_when_idle(engine.sync_engine)
    return engine


# A connection that sat in the pool longer than this is pinged before its next use.
IDLE_PING_S = 1.0


def ping_when_idle(engine: Engine, idle_s: float = IDLE_PING_S) -> None:
    """`pool_pre_ping`, for the connections that need it: a restarted PostgreSQL leaves every pooled
    connection dead, and those have all sat idle since it went away. Under load a connection comes
    back to the pool within milliseconds and is reused without the extra round trip; should the
    server die under load, the first statement's disconnect error invalidates the whole pool."""

    @event.listens_for(engine, "checkin")
    def _returned(dbapi_connection: Any, record: Any) -> None:
        record.info["returned_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        returned = record.info.get("returned_at")
        if returned is None or time.monotonic() - returned < idle_s:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:  # the pool replaces the connection
            raise DisconnectionError("the pooled connection did not answer") from exc


def make_async_sessionmaker(engine: AsyncEngine) -> async_sessionmaker:  # type: ignore[type-arg]
    return async_sessionmaker(engine, expire_on_commit=False)
