"""media: what sniffing found for each file; media counts and pre-processing time per attempt;
the hash of each job's request, to tell an idempotent replay from a reused key

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("files", sa.Column("media", postgresql.JSONB(astext_type=sa.Text()), nullable=True))
    op.add_column("job_metrics", sa.Column("images", sa.Integer(), nullable=True))
    op.add_column("job_metrics", sa.Column("audio_clips", sa.Integer(), nullable=True))
    op.add_column("job_metrics", sa.Column("audio_seconds", sa.Float(), nullable=True))
    op.add_column("job_metrics", sa.Column("preprocess_ms", sa.Float(), nullable=True))
    op.create_index("ix_files_user_created", "files", ["user_id", "created_at", "id"])
    op.add_column("jobs", sa.Column("request_hash", sa.String(length=64), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "request_hash")
    op.drop_index("ix_files_user_created", table_name="files")
    op.drop_column("job_metrics", "preprocess_ms")
    op.drop_column("job_metrics", "audio_seconds")
    op.drop_column("job_metrics", "audio_clips")
    op.drop_column("job_metrics", "images")
    op.drop_column("files", "media")
