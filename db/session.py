"""Engine and session factories. The caller owns the transaction; repositories never commit."""

from __future__ import annotations

import functools

from sqlalchemy import Engine, create_engine
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
    return create_async_engine(url, pool_pre_ping=True, pool_size=20, max_overflow=20, hide_parameters=True)


def make_async_sessionmaker(engine: AsyncEngine) -> async_sessionmaker:  # type: ignore[type-arg]
    return async_sessionmaker(engine, expire_on_commit=False)
