"""images: the runtime config of a registry image (Env, Entrypoint, Cmd, WorkingDir, User, ExposedPorts)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 19:30:00

Plain ALTER TABLE (recreate='never'), as 0005: a batch recreate of `images` would drop the
table and, with foreign keys on, empty image_layers by ON DELETE CASCADE. Existing images
came from S3 and have no config: NULL.
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('images', schema=None, recreate='never') as batch_op:
        batch_op.add_column(sa.Column('config', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('images', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('config')
