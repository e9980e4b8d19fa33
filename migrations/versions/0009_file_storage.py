"""files: a per-user storage quota (bytes and count, on the quota row) and retention (expires_at)

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Users made before this keep the defaults gemmaq ships with (core/settings.py).
    storage = sa.Column("max_storage_bytes", sa.BigInteger(), nullable=False, server_default=str(2 * 1024**3))
    op.add_column("quotas", storage)
    op.add_column("quotas", sa.Column("max_files", sa.Integer(), nullable=False, server_default="1000"))
    op.add_column("files", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_files_expires", "files", ["expires_at"], postgresql_where=sa.text("expires_at IS NOT NULL")
    )


def downgrade() -> None:
    op.drop_index("ix_files_expires", table_name="files")
    op.drop_column("files", "expires_at")
    op.drop_column("quotas", "max_files")
    op.drop_column("quotas", "max_storage_bytes")
