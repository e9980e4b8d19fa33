"""quotas: the day a job's tokens count against and what admission reserved; the usage ledger

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UTC_TODAY = sa.text("(now() AT TIME ZONE 'utc')::date")


def upgrade() -> None:
    op.add_column("jobs", sa.Column("charged_on", sa.Date(), server_default=UTC_TODAY, nullable=False))
    op.execute("UPDATE jobs SET charged_on = (created_at AT TIME ZONE 'utc')::date")
    op.add_column("jobs", sa.Column("reserved_tokens", sa.Integer(), server_default="0", nullable=False))
    op.create_table(
        "usage_ledger",
        sa.Column("user_id", sa.String(length=40), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("jobs", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_usage_ledger_user_id_users", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("user_id", "day", name="pk_usage_ledger"),
    )
    # Jobs that ended before the ledger existed.
    op.execute(
        """
        INSERT INTO usage_ledger (user_id, day, input_tokens, output_tokens, jobs)
        SELECT user_id, charged_on,
               sum((result->'usage'->>'input_tokens')::bigint),
               sum((result->'usage'->>'output_tokens')::bigint), count(*)
        FROM jobs WHERE result ? 'usage' GROUP BY user_id, charged_on
        """
    )


def downgrade() -> None:
    op.drop_table("usage_ledger")
    op.drop_column("jobs", "reserved_tokens")
    op.drop_column("jobs", "charged_on")
