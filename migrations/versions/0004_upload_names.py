"""The names clients gave a job's uploads, so that a worker's messages name the user's files.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("model_name", sa.String(200)))
    op.add_column("jobs", sa.Column("data_name", sa.String(200)))


def downgrade() -> None:
    op.drop_column("jobs", "data_name")
    op.drop_column("jobs", "model_name")
