"""Priority among tenants is the operator's to grant: quotas.max_priority (None: the deployment's,
GEMMAQ_QUOTA_MAX_PRIORITY) caps the priority a user's jobs reach among other users'; each job keeps
that capped priority (jobs.shared_priority) for the times it is sent again

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("quotas", sa.Column("max_priority", sa.SmallInteger(), nullable=True))
    op.add_column("jobs", sa.Column("shared_priority", sa.SmallInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "shared_priority")
    op.drop_column("quotas", "max_priority")
