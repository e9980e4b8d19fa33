"""job_metrics: the bytes a job's media took once decoded on the worker

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("job_metrics", sa.Column("media_bytes", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    op.drop_column("job_metrics", "media_bytes")
