"""Edits of a job's result (POST /v1/jobs/{id}/edits): run on a worker under a lease, like jobs.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "edits",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("selection", sa.JSON(), nullable=False),
        sa.Column("data_blob", sa.String(80)),
        sa.Column("data_format", sa.String(16)),
        sa.Column("data_name", sa.String(200)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("result", sa.JSON()),
        sa.Column("model_blob", sa.String(80)),
        sa.Column("error", sa.JSON()),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_owner", sa.String(120)),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True)),
        sa.Column("enqueued_at", sa.DateTime(timezone=True)),
    )
    op.create_index("ix_edits_job_created", "edits", ["job_id", "created_at", "id"])
    op.create_index("ix_edits_state_lease", "edits", ["state", "lease_expires_at"])


def downgrade() -> None:
    op.drop_index("ix_edits_state_lease", table_name="edits")
    op.drop_index("ix_edits_job_created", table_name="edits")
    op.drop_table("edits")
