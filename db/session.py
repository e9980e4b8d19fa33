"""Engine and session factories. The caller owns the transaction; repositories never commit."""

from __future__ import annotations

import functools
import time
from typing import Any

from psycopg import errors
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import DisconnectionError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import sessionmaker


@functools.cache
def sync_engine(url: str) -> Engine:
    # hide_parameters: bound values (prompts, outputs) never appear in exception messages or logs.
    engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, hide_parameters=True)
    follow_primary(engine)
    return engine


@functools.cache
def autocommit_engine(url: str) -> Engine:
    """For work that is one statement (a job's claim, its finish): each its own transaction, in
    one round trip (no BEGIN, no COMMIT). No pre-ping either: its callers retry on
    OperationalError, and the error that a stale connection raises invalidates the pool."""
    engine = create_engine(
        url, isolation_level="AUTOCOMMIT", pool_size=10, max_overflow=20, hide_parameters=True
    )
    follow_primary(engine)
    return engine


@functools.cache
def sync_sessionmaker(url: str) -> sessionmaker:  # type: ignore[type-arg]
    return sessionmaker(sync_engine(url), expire_on_commit=False)


def async_engine(url: str) -> AsyncEngine:
    engine = create_async_engine(url, pool_size=20, max_overflow=20, hide_parameters=True)
    ping_when_idle(engine.sync_engine)
    follow_primary(engine.sync_engine)
    return engine


def follow_primary(engine: Engine) -> None:
    """A write refused because the server is read-only (a PostgreSQL switchover: the old primary
    demoted and up, or a standby a multi-host URL reached first) is a lost connection as far as
    gemmaq goes, which SQLAlchemy does not count it as: the pool drops every connection it holds
    (the next ones are made by libpq, which with `target_session_attrs=read-write` skips a server
    that is not the primary), and the error is raised as an OperationalError, which every caller
    already retries or answers 503 to."""

    @event.listens_for(engine, "handle_error")
    def _read_only(context: ExceptionContext) -> OperationalError | None:
        if not isinstance(context.original_exception, errors.ReadOnlySqlTransaction):
            return None
        context.is_disconnect = True
        return OperationalError(
            context.statement,
            context.parameters,
            context.original_exception,
            hide_parameters=True,
            connection_invalidated=True,
        )


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
