"""jobs.expires_at: clamp times a tenant sent far ahead (up to year 10000, which the driver cannot
read back) to 30 days after the job was created, the bound the API now enforces at submission

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        "UPDATE jobs SET expires_at = created_at + interval '30 days' "
        "WHERE expires_at > created_at + interval '30 days'"
    )


def downgrade() -> None:
    """Nothing to restore: the clamped times were never readable."""
