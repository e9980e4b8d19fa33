"""job_metrics: constrained decoding's grammar compile time and mean mask time per step

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("job_metrics", sa.Column("grammar_compile_ms", sa.Float(), nullable=True))
    op.add_column("job_metrics", sa.Column("grammar_mask_ms", sa.Float(), nullable=True))


def downgrade() -> None:
    op.drop_column("job_metrics", "grammar_mask_ms")
    op.drop_column("job_metrics", "grammar_compile_ms")
