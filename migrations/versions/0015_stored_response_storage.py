"""responses: what a stored response keeps (bytes, counted in its owner's storage quota beside
their files) and when it expires (with the files' retention); rows from before count their
JSON as stored and expire 30 days on

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("responses", sa.Column("bytes", sa.BigInteger(), nullable=False, server_default="0"))
    op.add_column("responses", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    op.execute(
        "UPDATE responses SET bytes = octet_length(input_items::text) + octet_length(context::text)"
        " + coalesce(octet_length(instructions), 0) + octet_length(metadata::text),"
        " expires_at = now() + interval '30 days'"
    )


def downgrade() -> None:
    op.drop_column("responses", "expires_at")
    op.drop_column("responses", "bytes")
