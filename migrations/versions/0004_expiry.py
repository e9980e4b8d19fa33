"""expiry: a deadline a queued job may carry, and the `expired` status it ends in

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD = "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')"
NEW = "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'expired')"


def upgrade() -> None:
    op.add_column("jobs", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    op.drop_constraint(op.f("ck_jobs_status"), "jobs", type_="check")
    op.create_check_constraint(op.f("ck_jobs_status"), "jobs", NEW)
    op.create_index("ix_jobs_running", "jobs", ["status"], postgresql_where=sa.text("status = 'running'"))


def downgrade() -> None:
    op.drop_index("ix_jobs_running", table_name="jobs")
    op.execute("UPDATE jobs SET status = 'cancelled' WHERE status = 'expired'")
    op.drop_constraint(op.f("ck_jobs_status"), "jobs", type_="check")
    op.create_check_constraint(op.f("ck_jobs_status"), "jobs", OLD)
    op.drop_column("jobs", "expires_at")
