"""job_notes (wait episodes, abort requests), job_events.detail, jobs.waiting_since

History tells the whole story: which layer a transition concerned (job_events.detail,
JSON from the workflow's describe hook), each episode of waiting on a guard or a retry
back-off and each abort request (job_notes, append-only); and what a job waits on now
(jobs.waiting_since, with the reason in jobs.error).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 10:00:00
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('job_notes',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('state', sa.String(length=64), nullable=False),
    sa.Column('event', sa.String(length=64), nullable=True),
    sa.Column('started_at', sa.DateTime(), nullable=False),
    sa.Column('finished_at', sa.DateTime(), nullable=False),
    sa.Column('reasons', sa.Text(), nullable=False),
    sa.Column('waits', sa.Integer(), nullable=False),
    sa.Column('outcome', sa.String(length=32), nullable=True),
    sa.Column('requested_by_pid', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_notes_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job_notes'))
    )
    with op.batch_alter_table('job_notes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_job_notes_job_id'), ['job_id'], unique=False)
    with op.batch_alter_table('job_events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('detail', sa.Text(), nullable=True))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('waiting_since', sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('job_notes', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_job_notes_job_id'))
    op.drop_table('job_notes')
    # recreate="never": SQLite (>= 3.35) drops a column in place. The default copy-and-move
    # would drop `jobs`, and with foreign keys on that cascades into every job's history.
    with op.batch_alter_table('job_events', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('detail')
    with op.batch_alter_table('jobs', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('waiting_since')
