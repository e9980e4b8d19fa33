"""The Alembic migrations build exactly the schema the SQLAlchemy models describe."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

import db.models  # noqa: F401  (registers every table)
from db.base import Base
from tests.helpers.stack import Stack

pytestmark = pytest.mark.stack


def test_migrations_match_the_models(stack: Stack) -> None:
    engine = create_engine(stack.settings().db_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()
