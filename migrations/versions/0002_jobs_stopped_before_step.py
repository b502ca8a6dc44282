"""jobs.stopped_before_step: a job stopped by a shutdown before its state's step began

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 13:40:00
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('stopped_before_step', sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    # In place (SQLite >= 3.35): a batch copy of jobs would drop the old table, and with
    # foreign keys on, job_events' ON DELETE CASCADE would take every job's history with it.
    with op.batch_alter_table('jobs', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('stopped_before_step')
